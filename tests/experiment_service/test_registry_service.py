"""The experiment registry through the real service process: the lifecycle with its versions, phases and audit,
listing, bad input with the status naming the field, the caller's identity from chassis auth, and PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from chassis.auth import Role, token_line
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.api.experiments.v1 import experiment_service_pb2 as pb
from fresco.api.experiments.v1 import experiment_service_pb2_grpc as pb_grpc
from fresco.servers import PostgresServer
from fresco.servers.pytest_plugin import postgres_server
from fresco.suite import ServiceProcess
from tests.experiment_service.service_support import create_and_start, experiment, running, stub_for

__all__ = ["postgres_server"]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    with running(tmp_path_factory.mktemp("experiments")) as process:
        yield process


@pytest.fixture(scope="module")
def stub(service: ServiceProcess) -> Iterator[pb_grpc.ExperimentServiceStub]:
    with stub_for(service) as stub:
        yield stub


def fresh(prefix: str = "exp") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def failure(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call()  # type: ignore[operator]
    return raised.value.code(), raised.value.details() or ""


def lifecycle(stub: pb_grpc.ExperimentServiceStub) -> None:
    key = fresh()
    created = stub.CreateExperiment(pb.CreateExperimentRequest(experiment=experiment(key, (0.9, 0.1)))).experiment
    assert (created.status, created.version, list(created.phases)) == (xpb.EXPERIMENT_STATUS_DRAFT, 1, [])
    assert created.created_at.seconds > 0
    assert created.updated_by == "anonymous"
    assert stub.GetExperiment(pb.GetExperimentRequest(key=key)).experiment == created

    started = stub.StartExperiment(pb.StartExperimentRequest(key=key, expected_version=1)).experiment
    assert (started.status, started.version) == (xpb.EXPERIMENT_STATUS_RUNNING, 2)
    assert [(p.number, list(p.weights), p.experiment_version) for p in started.phases] == [(1, [0.9, 0.1], 2)]

    patch = experiment(key, coverage=0.5, hypothesis="wider")
    update = pb.UpdateExperimentRequest(experiment=patch, update_mask=FieldMask(paths=["coverage"]), expected_version=2)
    reply = stub.UpdateExperiment(update)
    assert (reply.new_phase, reply.experiment.coverage, reply.experiment.version) == (False, 0.5, 3)
    assert reply.experiment.hypothesis == created.hypothesis  # not in the mask: unchanged
    assert len(reply.experiment.phases) == 1

    patch = experiment(key, (0.5, 0.5))
    update = pb.UpdateExperimentRequest(experiment=patch, update_mask=FieldMask(paths=["arms"]), expected_version=3)
    reply = stub.UpdateExperiment(update)
    phases = reply.experiment.phases
    assert reply.new_phase
    assert reply.experiment.version == 4
    assert [(p.number, list(p.weights), p.experiment_version) for p in phases] == [
        (1, [0.9, 0.1], 2),
        (2, [0.5, 0.5], 4),
    ]
    assert phases[0].HasField("ended_at")
    assert not phases[1].HasField("ended_at")

    stopped = stub.StopExperiment(pb.StopExperimentRequest(key=key, expected_version=4, reason="enough")).experiment
    assert (stopped.status, stopped.stop_reason, stopped.version) == (xpb.EXPERIMENT_STATUS_STOPPED, "enough", 5)
    assert stopped.phases[-1].HasField("ended_at")

    entries = stub.ListAuditEntries(pb.ListAuditEntriesRequest(key=key)).entries
    assert [(e.version, e.action, e.identity) for e in entries] == [
        (1, "create", "anonymous"),
        (2, "start", "anonymous"),
        (3, "update", "anonymous"),
        (4, "update", "anonymous"),
        (5, "stop", "anonymous"),
    ]
    assert "phase 2 starts with weights [0.5, 0.5]" in entries[3].detail


def test_the_lifecycle_is_versioned_phased_and_audited(stub: pb_grpc.ExperimentServiceStub) -> None:
    lifecycle(stub)


def test_the_lifecycle_on_postgresql(postgres_server: PostgresServer, tmp_path: Path) -> None:
    url = postgres_server.create_database(f"experiments_{uuid.uuid4().hex[:12]}")
    with running(tmp_path, "--database-url", url) as process, stub_for(process) as stub:
        lifecycle(stub)
    assert not (tmp_path / "experiments.db").exists()


def test_bad_input_gets_the_status_naming_the_field(stub: pb_grpc.ExperimentServiceStub) -> None:
    def create(e: xpb.Experiment) -> object:
        return lambda: stub.CreateExperiment(pb.CreateExperimentRequest(experiment=e))

    code, details = failure(create(experiment(fresh(), (0.0, 0.0))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "arms: weights must sum to a positive total" in details
    code, details = failure(create(experiment(fresh(), (0.5, -0.5))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "arms[1].weight" in details
    code, details = failure(lambda: stub.CreateExperiment(pb.CreateExperimentRequest()))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("experiment:")

    unknown = fresh("unknown")
    for call in (
        lambda: stub.GetExperiment(pb.GetExperimentRequest(key=unknown)),
        lambda: stub.StartExperiment(pb.StartExperimentRequest(key=unknown, expected_version=1)),
        lambda: stub.ListAuditEntries(pb.ListAuditEntriesRequest(key=unknown)),
    ):
        code, details = failure(call)
        assert code == grpc.StatusCode.NOT_FOUND
        assert details == f"key: no experiment {unknown!r}"
    code, details = failure(lambda: stub.GetExperiment(pb.GetExperimentRequest(key="Not A Key")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("key:")

    e = create_and_start(stub, experiment(fresh()))
    code, details = failure(lambda: stub.StopExperiment(pb.StopExperimentRequest(key=e.key, expected_version=1)))
    assert code == grpc.StatusCode.ABORTED
    assert "expected_version: the experiment is at version 2, not 1" in details
    code, details = failure(lambda: stub.StartExperiment(pb.StartExperimentRequest(key=e.key, expected_version=2)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "status: start needs an experiment in DRAFT" in details
    salted = pb.UpdateExperimentRequest(
        experiment=experiment(e.key, salt="other"), update_mask=FieldMask(paths=["salt"]), expected_version=2
    )
    code, details = failure(lambda: stub.UpdateExperiment(salted))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.startswith("salt: fixed once the experiment has run")
    status = pb.UpdateExperimentRequest(experiment=e, update_mask=FieldMask(paths=["status"]), expected_version=2)
    code, details = failure(lambda: stub.UpdateExperiment(status))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "update_mask.paths[0]: 'status' is set by the service" in details
    zero = pb.UpdateExperimentRequest(
        experiment=experiment(e.key, (0.0, 0.0)), update_mask=FieldMask(paths=["arms"]), expected_version=2
    )
    code, details = failure(lambda: stub.UpdateExperiment(zero))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "arms: weights must sum to a positive total" in details
    code, details = failure(create(experiment(e.key)))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert details.startswith("experiment.key:")
    # None of the refused calls changed anything.
    assert stub.GetExperiment(pb.GetExperimentRequest(key=e.key)).experiment == e


def test_listing_filters_and_pages(stub: pb_grpc.ExperimentServiceStub) -> None:
    model = fresh("model")
    keys = sorted(fresh("list") for _ in range(3))
    for key in keys:
        stub.CreateExperiment(pb.CreateExperimentRequest(experiment=experiment(key, model_name=model)))
    stub.StartExperiment(pb.StartExperimentRequest(key=keys[1], expected_version=1))
    seen, token = [], ""
    while True:
        page = stub.ListExperiments(pb.ListExperimentsRequest(model_name=model, page_size=2, page_token=token))
        seen += [e.key for e in page.experiments]
        token = page.next_page_token
        if not token:
            break
    assert seen == keys
    running_only = stub.ListExperiments(
        pb.ListExperimentsRequest(model_name=model, statuses=[xpb.EXPERIMENT_STATUS_RUNNING])
    )
    assert [e.key for e in running_only.experiments] == [keys[1]]
    code, _ = failure(lambda: stub.ListExperiments(pb.ListExperimentsRequest(page_token="garbage")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_audit_records_the_authenticated_caller(tmp_path: Path) -> None:
    tokens = {"dana": (Role.DEPLOYER, "dana-deployer-token"), "vik": (Role.VIEWER, "vik-viewer-token")}
    (tmp_path / "tokens").write_text("".join(token_line(n, role, t) + "\n" for n, (role, t) in tokens.items()))
    with running(tmp_path, "--auth-tokens-file", str(tmp_path / "tokens")) as process, stub_for(process) as stub:
        request = pb.CreateExperimentRequest(experiment=experiment("exp-audited"))
        viewer = (("authorization", "Bearer vik-viewer-token"),)
        code, _ = failure(lambda: stub.CreateExperiment(request, metadata=viewer))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        deployer = (("authorization", "Bearer dana-deployer-token"),)
        created = stub.CreateExperiment(request, metadata=deployer).experiment
        stub.StartExperiment(pb.StartExperimentRequest(key="exp-audited", expected_version=1), metadata=deployer)
        entries = stub.ListAuditEntries(pb.ListAuditEntriesRequest(key="exp-audited")).entries
    assert created.updated_by == "dana"
    assert [(e.action, e.identity) for e in entries] == [("create", "dana"), ("start", "dana")]
