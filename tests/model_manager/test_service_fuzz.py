"""Fuzzed registry requests against the running model manager: every answer is OK or a caller's error with a
message, never INTERNAL or UNKNOWN, and the service stays healthy."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fresco.api.features.v1 import statistics_pb2 as spb
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as pb_grpc
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.servers import PostgresServer
from fresco.servers.pytest_plugin import postgres_server
from fresco.suite import ServiceProcess
from tests.rpc import outcome

__all__ = ["postgres_server"]
pytestmark = pytest.mark.integration

CALLER_ERRORS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
}
MODELS = ["fuzz-a", "fuzz-b"]
names = st.one_of(st.sampled_from([*MODELS, "", "nope", "a b", "x" * 200, "é", "a\x00b"]), st.text(max_size=20))
texts = st.text(max_size=40)
floats = st.floats(allow_nan=True, allow_infinity=True)
int64 = st.integers(-(2**63), 2**63 - 1)
int32 = st.integers(-(2**31), 2**31 - 1)
hexes = st.one_of(st.just("a" * 64), st.text("0123456789abcdefABCDEF", min_size=60, max_size=66), texts)
tensors = st.builds(
    rpb.TensorSpec,
    name=texts,
    datatype=st.sampled_from(["FP32", "INT64", "float", ""]),
    shape=st.lists(int64, max_size=3),
)
signatures = st.builds(
    rpb.ModelSignature,
    inputs=st.lists(tensors, max_size=2),
    outputs=st.lists(tensors, max_size=2),
    feature_refs=st.lists(texts, max_size=3),
    feature_input=texts,
)
statistics = st.builds(
    spb.FeatureStatistics,
    feature_name=texts,
    count=int64,
    null_count=int64,
    null_rate=floats,
    numeric=st.builds(
        spb.NumericStatistics,
        mean=floats,
        stddev=floats,
        percentiles=st.lists(st.builds(spb.Percentile, quantile=floats, value=floats), max_size=3),
        histogram=st.builds(
            spb.Histogram, bucket_bounds=st.lists(floats, max_size=3), bucket_counts=st.lists(int64, max_size=4)
        ),
    ),
)
reports = st.builds(
    rpb.TrainingReport,
    metrics=st.dictionaries(texts, floats, max_size=3),
    feature_importance=st.dictionaries(texts, floats, max_size=2),
    calibration=st.builds(
        rpb.Calibration,
        bins=st.lists(
            st.builds(rpb.CalibrationBin, lower=floats, upper=floats, mean_predicted=floats, count=int64), max_size=2
        ),
        brier_score=floats,
    ),
    slices=st.lists(st.builds(rpb.SliceMetrics, slice=texts, count=int64), max_size=2),
    evaluation_dataset_sha256=hexes,
)


def often(value: object, strategy: st.SearchStrategy) -> st.SearchStrategy:
    """`value` about half the time, so that the checks behind a field are reached too."""
    return st.one_of(st.just(value), strategy)


metadatas = st.builds(
    pb.UploadModelVersionMetadata,
    model_name=often(MODELS[0], names),
    format=often(rpb.MODEL_FORMAT_ONNX, st.integers(-3, 9)),
    framework=texts,
    signature=often(rpb.ModelSignature(), signatures),
    training_statistics=often([], st.lists(statistics, max_size=2)),
    report=often(rpb.TrainingReport(), reports),
    description=texts,
    labels=often({}, st.dictionaries(texts, texts, max_size=3)),
    expected_sha256=hexes,
    expected_size_bytes=often(0, int64),
    lineage=often(
        rpb.Lineage(),
        st.builds(rpb.Lineage, code_commit=texts, training_dataset_sha256=hexes, parent_version=often(1, int64)),
    ),
    reason=texts,
    backend_hints=often(
        rpb.BackendHints(), st.builds(rpb.BackendHints, expected_memory_bytes=int64, max_batch_size=int32)
    ),
    version=often(0, st.one_of(int64, st.integers(0, 3))),
)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def channel(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[grpc.Channel]:
    """A model manager on SQLite, then one on PostgreSQL (which refuses more than SQLite does, e.g. NUL in text)."""
    root: Path = tmp_path_factory.mktemp("fuzz")
    args = ["--data-dir", str(root), "--port", "0", "--metrics-port", "-1", "--max-artifact-bytes", "4096"]
    if request.param == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        args += ["--database-url", server.create_database(f"fuzz_{uuid.uuid4().hex[:12]}")]
    service = ServiceProcess("model_manager", args).start()
    try:
        service.wait_healthy(60)
        with grpc.insecure_channel(service.address) as channel:
            stub = pb_grpc.ModelManagerServiceStub(channel)
            for model in MODELS:
                stub.CreateModel(pb.CreateModelRequest(model=rpb.Model(name=model)))
            yield channel
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        assert service.stop() == 0


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(
    model=st.builds(
        rpb.Model, name=names, owner=texts, description=texts, labels=st.dictionaries(texts, texts, max_size=3)
    ),
    signature=signatures,
)
def test_create_model_never_fails_internally(channel, model, signature) -> None:
    model.signature.CopyFrom(signature)
    stub = pb_grpc.ModelManagerServiceStub(channel)
    assert outcome(lambda: stub.CreateModel(pb.CreateModelRequest(model=model), timeout=30)) in CALLER_ERRORS


@FUZZ
@given(meta=metadatas, chunks=st.lists(st.binary(max_size=3000), max_size=3), fix_digest=st.booleans())
def test_upload_never_fails_internally(channel, meta, chunks, fix_digest) -> None:
    if fix_digest:  # half the uploads carry the right digest, so their metadata is what gets judged
        meta.expected_sha256 = hashlib.sha256(b"".join(chunks)).hexdigest()
    requests = [pb.UploadModelVersionRequest(metadata=meta), *(pb.UploadModelVersionRequest(chunk=c) for c in chunks)]
    stub = pb_grpc.ModelManagerServiceStub(channel)
    assert outcome(lambda: stub.UploadModelVersion(iter(requests), timeout=30)) in CALLER_ERRORS


@FUZZ
@given(
    kind=st.sampled_from(["version", "stage", "alias", "latest"]),
    model=names,
    version=int64,
    stage=st.integers(-2, 9),
    alias=texts,
    page_size=int32,
    token=st.one_of(texts, st.sampled_from(["", "djox", "bTpmdXp6LWE", "YToxMg"])),
)
def test_reads_never_fail_internally(channel, kind, model, version, stage, alias, page_size, token) -> None:
    stub = pb_grpc.ModelManagerServiceStub(channel)
    request = pb.GetModelVersionRequest(model_name=model)
    if kind == "version":
        request.version = version
    elif kind == "stage":
        request.stage = stage  # type: ignore[assignment]
    elif kind == "alias":
        request.alias = alias
    calls = [
        lambda: stub.GetModelVersion(request, timeout=30),
        lambda: stub.GetModel(pb.GetModelRequest(name=model), timeout=30),
        lambda: stub.ListModels(pb.ListModelsRequest(page_size=page_size, page_token=token, owner=alias), timeout=30),
        lambda: stub.ListModelVersions(
            pb.ListModelVersionsRequest(model_name=model, page_size=page_size, page_token=token, stages=[stage]),
            timeout=30,
        ),
        lambda: stub.ListAuditRecords(
            pb.ListAuditRecordsRequest(model_name=model, page_size=page_size, page_token=token), timeout=30
        ),
    ]
    for call in calls:
        assert outcome(call) in CALLER_ERRORS


@FUZZ
@given(model=names, alias=st.one_of(texts, st.sampled_from(["champion", "prod"])), version=int64, delete=st.booleans())
def test_alias_changes_never_fail_internally(channel, model, alias, version, delete) -> None:
    stub = pb_grpc.ModelManagerServiceStub(channel)
    if delete:
        call = lambda: stub.DeleteModelAlias(pb.DeleteModelAliasRequest(model_name=model, alias=alias), timeout=30)  # noqa: E731
    else:
        request = pb.SetModelAliasRequest(model_name=model, alias=alias, version=version)
        call = lambda: stub.SetModelAlias(request, timeout=30)  # noqa: E731
    assert outcome(call) in CALLER_ERRORS
