"""The model manager as a process (`python -m model_manager`): registry RPCs end to end, corrupt uploads refused
with nothing left behind, and health that waits for the database."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chassis.auth import Role, token_line
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as pb_grpc
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.servers import PostgresServer
from fresco.servers._process import free_port
from fresco.suite import ServiceProcess
from tests.model_manager.registry_support import report, signature, statistics

pytestmark = pytest.mark.integration

CONTENT = b"\x08\x07" + bytes(range(256)) * 300


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model_manager")


@pytest.fixture(scope="module")
def service(data_dir: Path) -> Iterator[ServiceProcess]:
    args = ["--data-dir", str(data_dir), "--port", "0", "--metrics-port", "-1", "--max-artifact-bytes", "1000000"]
    process = ServiceProcess("model_manager", args).start()
    try:
        process.wait_healthy(60)
        yield process
    finally:
        assert process.stop() == 0


@pytest.fixture(scope="module")
def stub(service: ServiceProcess) -> Iterator[pb_grpc.ModelManagerServiceStub]:
    with grpc.insecure_channel(service.address) as channel:
        yield pb_grpc.ModelManagerServiceStub(channel)


@pytest.fixture
def name(stub: pb_grpc.ModelManagerServiceStub) -> str:
    """A model of this test's own, created."""
    model = f"m-{uuid.uuid4().hex[:10]}"
    stub.CreateModel(pb.CreateModelRequest(model=rpb.Model(name=model, owner="risk", signature=signature())))
    return model


def metadata(model: str, content: bytes, **fields: object) -> pb.UploadModelVersionMetadata:
    values: dict[str, object] = {
        "model_name": model,
        "format": rpb.MODEL_FORMAT_ONNX,
        "expected_sha256": hashlib.sha256(content).hexdigest(),
        "expected_size_bytes": len(content),
        "signature": signature(),
        "training_statistics": statistics(),
        "report": report(),
        "lineage": rpb.Lineage(code_commit="abc123", training_dataset_uri="file:///d.parquet"),
        "backend_hints": rpb.BackendHints(expected_memory_bytes=1 << 20),
        "reason": "nightly",
    }
    return pb.UploadModelVersionMetadata(**{**values, **fields})  # type: ignore[arg-type]


def stream(meta: pb.UploadModelVersionMetadata | None, content: bytes, chunk: int = 10_000):
    if meta is not None:
        yield pb.UploadModelVersionRequest(metadata=meta)
    for i in range(0, len(content), chunk):
        yield pb.UploadModelVersionRequest(chunk=content[i : i + chunk])


def artifact_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in (data_dir / "artifacts").rglob("*") if p.is_file())


def error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_a_model_is_created_read_and_listed(stub: pb_grpc.ModelManagerServiceStub, name: str) -> None:
    model = stub.GetModel(pb.GetModelRequest(name=name)).model
    assert (model.name, model.owner, model.latest_version) == (name, "risk", 0)
    assert model.signature == signature()
    err = error(lambda: stub.CreateModel(pb.CreateModelRequest(model=rpb.Model(name=name))))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    err = error(lambda: stub.GetModel(pb.GetModelRequest(name="never-made")))
    assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND, "name: no model named 'never-made'")
    names, token = [], ""
    while True:
        page = stub.ListModels(pb.ListModelsRequest(page_size=1, page_token=token, owner="risk"))
        names += [m.name for m in page.models]
        token = page.next_page_token
        if not token:
            break
    assert name in names
    assert names == sorted(names)


def test_an_uploaded_version_reads_back_whole(stub: pb_grpc.ModelManagerServiceStub, name: str, data_dir: Path) -> None:
    reply = stub.UploadModelVersion(stream(metadata(name, CONTENT), CONTENT))
    version = reply.model_version
    assert reply.sha256_verified
    assert (version.version, version.stage, version.size_bytes) == (1, rpb.MODEL_STAGE_REGISTERED, len(CONTENT))
    assert version.sha256 == hashlib.sha256(CONTENT).hexdigest()
    assert version.created_by == "anonymous"  # an insecure channel carries no authenticated identity
    assert Path(version.artifact_uri.removeprefix("file://")).read_bytes() == CONTENT
    assert list(version.training_statistics) == list(statistics())
    assert version.report == report()
    assert version.lineage.code_commit == "abc123"
    assert version.backend_hints.expected_memory_bytes == 1 << 20
    assert stub.GetModelVersion(pb.GetModelVersionRequest(model_name=name, version=1)).model_version == version
    assert stub.GetModelVersion(pb.GetModelVersionRequest(model_name=name)).model_version == version
    by_stage = pb.GetModelVersionRequest(model_name=name, stage=rpb.MODEL_STAGE_REGISTERED)
    assert stub.GetModelVersion(by_stage).model_version.version == 1
    second = stub.UploadModelVersion(stream(metadata(name, CONTENT, lineage=rpb.Lineage(parent_version=1)), CONTENT))
    assert (second.model_version.version, second.model_version.artifact_uri) == (2, version.artifact_uri)
    listed = stub.ListModelVersions(pb.ListModelVersionsRequest(model_name=name, page_size=1))
    assert [v.version for v in listed.model_versions] == [2]
    rest = stub.ListModelVersions(pb.ListModelVersionsRequest(model_name=name, page_token=listed.next_page_token))
    assert ([v.version for v in rest.model_versions], rest.next_page_token) == ([1], "")
    assert artifact_files(data_dir).count(Path(version.artifact_uri.removeprefix("file://"))) == 1


def test_aliases_and_the_audit_log(stub: pb_grpc.ModelManagerServiceStub, name: str) -> None:
    stub.UploadModelVersion(stream(metadata(name, b"v1"), b"v1"))
    stub.UploadModelVersion(stream(metadata(name, b"v2"), b"v2"))
    moved = stub.SetModelAlias(pb.SetModelAliasRequest(model_name=name, alias="champion", version=1, reason="best"))
    assert (dict(moved.model.aliases), moved.previous_version) == ({"champion": 1}, 0)
    moved = stub.SetModelAlias(pb.SetModelAliasRequest(model_name=name, alias="champion", version=2))
    assert moved.previous_version == 1
    by_alias = stub.GetModelVersion(pb.GetModelVersionRequest(model_name=name, alias="champion")).model_version
    assert (by_alias.version, list(by_alias.aliases)) == (2, ["champion"])
    gone = stub.DeleteModelAlias(pb.DeleteModelAliasRequest(model_name=name, alias="champion", reason="retired"))
    assert (dict(gone.model.aliases), gone.previous_version) == ({}, 2)
    err = error(lambda: stub.GetModelVersion(pb.GetModelVersionRequest(model_name=name, alias="champion")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    records = stub.ListAuditRecords(pb.ListAuditRecordsRequest(model_name=name)).records
    assert [(r.action, r.identity, r.reason) for r in records] == [
        ("alias.delete", "anonymous", "retired"),
        ("alias.set", "anonymous", ""),
        ("alias.set", "anonymous", "best"),
        ("version.register", "anonymous", "nightly"),
        ("version.register", "anonymous", "nightly"),
        ("model.create", "anonymous", ""),
    ]


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("bad-sha256", grpc.StatusCode.INVALID_ARGUMENT, "metadata.expected_sha256: the 76802 bytes received hash to"),
        ("truncated", grpc.StatusCode.INVALID_ARGUMENT, "ended after 50000 bytes; metadata.expected_size_bytes"),
        ("oversize", grpc.StatusCode.INVALID_ARGUMENT, "exceeds the registry's limit of 1000000 bytes"),
        ("no-sha256", grpc.StatusCode.INVALID_ARGUMENT, "metadata.expected_sha256: expected 64 hexadecimal digits"),
        ("bad-metadata", grpc.StatusCode.INVALID_ARGUMENT, "metadata.report.metrics[auc]: expected a finite number"),
        ("chunk-first", grpc.StatusCode.INVALID_ARGUMENT, "metadata: expected the first message to carry the metadata"),
        ("metadata-twice", grpc.StatusCode.INVALID_ARGUMENT, "metadata: sent again"),
        ("empty-stream", grpc.StatusCode.INVALID_ARGUMENT, "got an empty stream"),
        ("unknown-model", grpc.StatusCode.NOT_FOUND, "metadata.model_name: no model named 'never-made'"),
    ],
)
def test_a_corrupt_upload_is_refused_and_leaves_nothing_behind(
    stub: pb_grpc.ModelManagerServiceStub, name: str, data_dir: Path, case: str, code: grpc.StatusCode, message: str
) -> None:
    before = artifact_files(data_dir)
    good = metadata(name, CONTENT)
    requests = {
        "bad-sha256": lambda: stream(good, CONTENT[:-1] + b"?"),
        "truncated": lambda: stream(good, CONTENT[:50_000]),
        "oversize": lambda: stream(metadata(name, CONTENT * 20, expected_size_bytes=0), CONTENT * 20),
        "no-sha256": lambda: stream(metadata(name, CONTENT, expected_sha256=""), CONTENT),
        "bad-metadata": lambda: stream(metadata(name, CONTENT, report=rpb.TrainingReport(metrics={"auc": 1e999})), b""),
        "chunk-first": lambda: stream(None, CONTENT),
        "metadata-twice": lambda: iter([pb.UploadModelVersionRequest(metadata=good)] * 2),
        "empty-stream": lambda: iter([]),
        "unknown-model": lambda: stream(metadata("never-made", CONTENT), CONTENT),
    }[case]
    err = error(lambda: stub.UploadModelVersion(requests()))
    assert err.code() == code
    assert message in (err.details() or "")
    assert artifact_files(data_dir) == before  # no new artifact, no temporary file
    assert stub.ListModelVersions(pb.ListModelVersionsRequest(model_name=name)).model_versions == []
    actions = [r.action for r in stub.ListAuditRecords(pb.ListAuditRecordsRequest(model_name=name)).records]
    assert actions == ["model.create"]


@pytest.mark.parametrize(
    ("call", "code", "message"),
    [
        (lambda s: s.ListModels(pb.ListModelsRequest(page_size=-1)), "INVALID_ARGUMENT", "page_size: expected 0"),
        (lambda s: s.ListModels(pb.ListModelsRequest(page_token="nope")), "INVALID_ARGUMENT", "page_token: expected"),
        (lambda s: s.CreateModel(pb.CreateModelRequest()), "INVALID_ARGUMENT", "model.name: expected a model name"),
        (
            lambda s: s.GetModelVersion(pb.GetModelVersionRequest(model_name="x", version=0)),
            "INVALID_ARGUMENT",
            "version: expected a version number 1 or more",
        ),
        (
            lambda s: s.GetModelVersion(pb.GetModelVersionRequest(model_name="x", stage=99)),
            "INVALID_ARGUMENT",
            "stage: expected one of MODEL_STAGE_REGISTERED",
        ),
        (
            lambda s: s.SetModelAlias(pb.SetModelAliasRequest(model_name="x", alias="Bad Alias", version=1)),
            "INVALID_ARGUMENT",
            "alias: expected an alias",
        ),
        (
            lambda s: s.ListModelVersions(pb.ListModelVersionsRequest(model_name="never-made")),
            "NOT_FOUND",
            "model_name: no model named 'never-made'",
        ),
        (
            lambda s: s.ListRollouts(pb.ListRolloutsRequest(page_size=-1)),
            "INVALID_ARGUMENT",
            "page_size: expected 0 (the default) to 1000, got -1",
        ),
    ],
)
def test_bad_requests_get_the_right_code_naming_the_field(stub, call, code: str, message: str) -> None:
    err = error(lambda: call(stub))
    assert err.code().name == code
    assert message in (err.details() or "")


def test_health_waits_for_the_database(tmp_path: Path) -> None:
    """NOT_SERVING (and UNAVAILABLE calls) while PostgreSQL is down; SERVING once it is up and the tables exist."""
    port = free_port()
    database = PostgresServer(port=port)
    args = ["--data-dir", str(tmp_path), "--port", "0", "--metrics-port", "-1", "--connect-retry-s", "0.2"]
    process = ServiceProcess("model_manager", [*args, "--database-url", database.url()]).start()
    try:
        with grpc.insecure_channel(process.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(service="fresco.models.v1.ModelManagerService"))
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            models = pb_grpc.ModelManagerServiceStub(channel)
            err = error(lambda: models.ListModels(pb.ListModelsRequest()))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert "registry database is not reachable" in (err.details() or "")
            database.start()
            process.wait_healthy(60)
            created = models.CreateModel(pb.CreateModelRequest(model=rpb.Model(name="on-postgres")))
            assert created.model.name == "on-postgres"
            stored = models.UploadModelVersion(stream(metadata("on-postgres", CONTENT), CONTENT)).model_version
            assert stored.version == 1
    finally:
        assert process.stop() == 0
        database.close()
    assert "registry database not reachable" in process.output()


def test_with_auth_on_registry_writes_need_a_deployer_and_the_audit_names_the_token(tmp_path: Path) -> None:
    """Missing token: UNAUTHENTICATED; a viewer: PERMISSION_DENIED; a deployer: done, and the audit
    records the token's holder, whatever owner or name the request itself carries."""
    tokens = {"dana": (Role.DEPLOYER, "dana-deployer-token"), "vik": (Role.VIEWER, "vik-viewer-token")}
    (tmp_path / "tokens").write_text("".join(token_line(n, role, t) + "\n" for n, (role, t) in tokens.items()))
    args = ["--data-dir", str(tmp_path / "data"), "--port", "0", "--metrics-port", "-1"]
    process = ServiceProcess("model_manager", [*args, "--auth-tokens-file", str(tmp_path / "tokens")]).start()
    try:
        process.wait_healthy(60)
        with grpc.insecure_channel(process.address) as channel:
            stub = pb_grpc.ModelManagerServiceStub(channel)
            create = pb.CreateModelRequest(model=rpb.Model(name="guarded", owner="mallory", signature=signature()))
            missing = error(lambda: stub.CreateModel(create))
            assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
            viewer = error(lambda: stub.CreateModel(create, metadata=(("authorization", "Bearer vik-viewer-token"),)))
            assert viewer.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "deployer" in (viewer.details() or "")
            stub.CreateModel(create, metadata=(("authorization", "Bearer dana-deployer-token"),))
            assert stub.GetModel(pb.GetModelRequest(name="guarded")).model.owner == "mallory"  # reads stay open
            records = stub.ListAuditRecords(pb.ListAuditRecordsRequest(model_name="guarded")).records
    finally:
        assert process.stop() == 0
    assert [(r.action, r.identity) for r in records] == [("model.create", "dana")]
