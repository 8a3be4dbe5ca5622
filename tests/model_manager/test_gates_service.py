"""PromoteModelVersion end to end against a real model manager process and a real feature service process:
gates pass or reject with the measured values, operations are watched and read back, bad requests get clear codes."""

from __future__ import annotations

import contextlib
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from chassis.auth import Role, token_line
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as pb_grpc
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.suite import ServiceProcess
from tests.model_manager.gate_support import (
    DEFINITIONS,
    REFS,
    Models,
    backtest_gate,
    signature,
    train_models,
    upload,
    wait_done,
)

pytestmark = pytest.mark.integration

SCHEMA = rpb.SchemaGate(check_feature_refs=True, require_output_compatibility=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gates")


@pytest.fixture(scope="module")
def models(root: Path) -> Models:
    return train_models(root)


@pytest.fixture(scope="module")
def features(root: Path) -> Iterator[ServiceProcess]:
    (root / "definitions.yaml").write_text(DEFINITIONS)
    args = ["--definitions", str(root / "definitions.yaml"), "--sqlite-path", str(root / "f.db"), "--port", "0"]
    process = ServiceProcess("feature_service", [*args, "--metrics-port", "-1"]).start()
    try:
        process.wait_healthy(60)
        yield process
    finally:
        process.stop()


def manager_args(data_dir: Path, features: ServiceProcess) -> list[str]:
    return [
        *("--data-dir", str(data_dir), "--port", "0", "--metrics-port", "-1"),
        *("--feature-service-address", features.address, "--feature-service-timeout-s", "120"),
    ]


@pytest.fixture(scope="module")
def stub(root: Path, features: ServiceProcess) -> Iterator[pb_grpc.ModelManagerServiceStub]:
    process = ServiceProcess("model_manager", manager_args(root / "manager", features)).start()
    try:
        process.wait_healthy(60)
        with grpc.insecure_channel(process.address) as channel:
            yield pb_grpc.ModelManagerServiceStub(channel)
    finally:
        assert process.stop() == 0, process.output()


def promote(stub: pb_grpc.ModelManagerServiceStub, model: str, version: int, **fields: Any) -> rpb.Operation:
    request = pb.PromoteModelVersionRequest(model_name=model, version=version, **fields)
    return stub.PromoteModelVersion(request).operation


def results(operation: rpb.Operation) -> dict[str, rpb.GateResult]:
    return {r.name: r for r in operation.gate_results}


def version_of(stub: pb_grpc.ModelManagerServiceStub, model: str, version: int) -> rpb.ModelVersion:
    return stub.GetModelVersion(pb.GetModelVersionRequest(model_name=model, version=version)).model_version


def error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_good_versions_pass_and_a_worse_one_is_rejected_with_what_was_measured(
    stub: pb_grpc.ModelManagerServiceStub, models: Models
) -> None:
    model = f"churn-{uuid.uuid4().hex[:8]}"
    gates = rpb.PromotionGates(schema=SCHEMA, backtest=backtest_gate(models.dataset))
    v1 = upload(stub, model, models.good)
    first = promote(stub, model, v1, gates=gates, target_stage=rpb.MODEL_STAGE_PRODUCTION, reason="first")
    assert first.stage == rpb.MODEL_STAGE_VALIDATING
    assert not first.done
    first = wait_done(stub, first.operation_id)
    assert (first.state, first.passed, first.stage) == (rpb.OPERATION_STATE_SUCCEEDED, True, rpb.MODEL_STAGE_PRODUCTION)
    assert "no production version" in results(first)["backtest.auc.max_regression"].detail

    v2 = upload(stub, model, models.worse)
    worse = wait_done(stub, promote(stub, model, v2, gates=gates, reason="nightly").operation_id)
    assert (worse.state, worse.passed, worse.stage) == (rpb.OPERATION_STATE_FAILED, False, rpb.MODEL_STAGE_REJECTED)
    checks = results(worse)
    absolute = checks["backtest.auc.min_value"]
    assert not absolute.passed
    assert absolute.measured_value < 0.7
    assert absolute.threshold == 0.8
    report = checks["backtest.dataset"].backtest
    assert (report.baseline_version, report.dataset_sha256, report.rows) == (v1, models.dataset_sha256, 1200)
    regression = checks["backtest.auc.max_regression"]
    assert not regression.passed
    assert regression.threshold == 0.02
    assert regression.measured_value == pytest.approx(report.baseline_metrics["auc"] - report.metrics["auc"])
    relative = checks["backtest.auc.max_relative_regression"]
    assert not relative.passed
    assert relative.measured_value == pytest.approx(regression.measured_value / report.baseline_metrics["auc"])
    assert not checks["backtest.logloss.max_value"].passed
    assert not checks["backtest.auc[country=FR].min_value"].passed  # slices are checked too
    assert "backtest.auc.min_value: auc" in worse.error
    assert "< min_value 0.8" in worse.error
    stored = version_of(stub, model, v2)
    assert stored.stage == rpb.MODEL_STAGE_REJECTED
    assert [r.name for r in stored.gate_results] == [r.name for r in worse.gate_results]

    v3 = upload(stub, model, models.good)
    good = wait_done(stub, promote(stub, model, v3, gates=gates).operation_id)
    assert (good.state, good.passed, good.stage) == (rpb.OPERATION_STATE_SUCCEEDED, True, rpb.MODEL_STAGE_CANDIDATE)
    checks = results(good)
    assert all(r.passed for r in good.gate_results)
    assert {"schema.artifact", "schema.feature_refs", "schema.output_compatibility"} <= set(checks)
    assert checks["backtest.auc.max_regression"].measured_value == pytest.approx(0.0)  # same model as production
    report = checks["backtest.dataset"].backtest
    assert {s.slice: s.count for s in report.slices} == {"country=FR": 400, "country=US": 800}
    assert sum(b.count for b in report.calibration.bins) == 1200
    assert version_of(stub, model, v3).gate_results[0].name == "schema.artifact"

    audit = stub.ListAuditRecords(pb.ListAuditRecordsRequest(model_name=model)).records
    rejected = next(r for r in audit if r.version == v2 and r.details["to"] == "rejected")
    assert rejected.details["operation_id"] == worse.operation_id
    assert "backtest.auc.min_value" in rejected.details["failed_gates"]
    assert rejected.details["gate.backtest.auc.max_regression"].startswith("failed: auc 0.")
    assert rejected.details["gate.schema.artifact"].startswith("passed: loads")
    moves = [(r.version, r.details["from"], r.details["to"]) for r in reversed(audit) if r.action == "version.stage"]
    assert moves[:3] == [
        (v1, "registered", "validating"),
        (v1, "validating", "candidate"),
        (v1, "candidate", "production"),
    ]


def test_a_dataset_that_changed_fails_the_backtest_naming_both_digests(
    stub: pb_grpc.ModelManagerServiceStub, models: Models
) -> None:
    model = f"sha-{uuid.uuid4().hex[:8]}"
    version = upload(stub, model, models.good)
    gates = rpb.PromotionGates(backtest=backtest_gate(models.dataset, dataset_sha256="0" * 64))
    operation = wait_done(stub, promote(stub, model, version, gates=gates).operation_id)
    check = results(operation)["backtest.dataset_sha256"]
    assert not check.passed
    assert f"expected {'0' * 64}" in check.detail
    assert models.dataset_sha256 in check.detail
    assert operation.stage == rpb.MODEL_STAGE_REJECTED


def test_an_unreadable_dataset_is_a_backtest_error(stub: pb_grpc.ModelManagerServiceStub, models: Models) -> None:
    model = f"gone-{uuid.uuid4().hex[:8]}"
    version = upload(stub, model, models.good)
    gates = rpb.PromotionGates(backtest=backtest_gate(models.dataset.with_name("missing.parquet")))
    operation = wait_done(stub, promote(stub, model, version, gates=gates).operation_id)
    check = results(operation)["backtest"]
    assert not check.passed
    assert check.detail.startswith("error: dataset_uri: cannot read file://")
    assert operation.state == rpb.OPERATION_STATE_FAILED
    assert "missing.parquet" in operation.error


def test_feature_refs_are_checked_against_the_feature_service(
    stub: pb_grpc.ModelManagerServiceStub, models: Models
) -> None:
    model = f"schema-{uuid.uuid4().hex[:8]}"
    refs = [*REFS[:3], "user_stats:nickname", "user_stats:ghost", "ghosts:s0"]
    version = upload(stub, model, models.good, signature(refs))
    operation = wait_done(stub, promote(stub, model, version, gates=rpb.PromotionGates(schema=SCHEMA)).operation_id)
    checks = results(operation)
    assert checks["schema.artifact"].passed
    refs_check = checks["schema.feature_refs"]
    assert not refs_check.passed
    assert refs_check.measured_value == 3
    assert "user_stats:nickname: VALUE_TYPE_STRING does not fit input 'X' of FP32" in refs_check.detail
    assert "user_stats:ghost: view 'user_stats' has no feature 'ghost'" in refs_check.detail
    assert "ghosts:s0: the feature service has no view 'ghosts'" in refs_check.detail
    assert operation.stage == rpb.MODEL_STAGE_REJECTED


def test_a_signature_the_artifact_does_not_have_fails_the_schema_gate(
    stub: pb_grpc.ModelManagerServiceStub, models: Models
) -> None:
    model = f"graph-{uuid.uuid4().hex[:8]}"
    wrong = signature()
    wrong.outputs[1].datatype = "FP64"
    version = upload(stub, model, models.good, wrong)
    operation = wait_done(stub, promote(stub, model, version).operation_id)  # the server's default gates: schema
    check = results(operation)["schema.artifact"]
    assert not check.passed
    assert "output 'probabilities' declared FP64, the graph has FP32" in check.detail


def test_with_no_predictor_the_latency_gate_is_an_error_and_a_dry_run_changes_nothing(
    stub: pb_grpc.ModelManagerServiceStub, models: Models
) -> None:
    model = f"latency-{uuid.uuid4().hex[:8]}"
    version = upload(stub, model, models.good)
    gates = rpb.PromotionGates(latency=rpb.LatencyGate(p99_budget_ms=1000))
    operation = wait_done(stub, promote(stub, model, version, gates=gates, dry_run=True).operation_id)
    check = results(operation)["latency.p99"]
    assert not check.passed
    # The manager has a fleet, but no predictor registered with it: the gate cannot measure, so it errs.
    assert check.detail.startswith(f"error: cannot load {model} v{version} on a predictor"), check.detail
    assert "no ready predictor" in check.detail, check.detail
    assert (operation.state, operation.passed, operation.dry_run) == (rpb.OPERATION_STATE_SUCCEEDED, False, True)
    assert version_of(stub, model, version).stage == rpb.MODEL_STAGE_REGISTERED


@contextlib.contextmanager
def paused(process: ServiceProcess) -> Iterator[None]:
    """SIGSTOP the process, so calls to it wait, until the block ends (SIGCONT, whatever happens)."""
    assert process.process is not None
    process.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        process.process.send_signal(signal.SIGCONT)


def test_watch_streams_the_operation_until_it_is_done(
    stub: pb_grpc.ModelManagerServiceStub, models: Models, features: ServiceProcess
) -> None:
    """The feature service is paused: the schema gate waits on it, so the watch sees the operation running first."""
    model = f"watch-{uuid.uuid4().hex[:8]}"
    version = upload(stub, model, models.good)
    with paused(features):
        started = promote(stub, model, version, gates=rpb.PromotionGates(schema=SCHEMA))
        stream = stub.WatchOperation(pb.WatchOperationRequest(operation_id=started.operation_id))
        first = next(stream).operation
        again = error(lambda: promote(stub, model, version, gates=rpb.PromotionGates(schema=SCHEMA)))
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION  # one promotion of a version at a time
    assert "is validating" in (again.details() or "")
    assert not first.done
    assert first.stage == rpb.MODEL_STAGE_VALIDATING
    rest = [message.operation for message in stream]
    assert rest
    assert rest[-1].done
    assert not any(op.done for op in rest[:-1])
    assert rest[-1].state == rpb.OPERATION_STATE_SUCCEEDED, rest[-1].error
    assert rest[-1].stage == rpb.MODEL_STAGE_CANDIDATE


@pytest.mark.parametrize(
    ("fields", "code", "message"),
    [
        ({"version": 99}, grpc.StatusCode.NOT_FOUND, "version: "),
        ({"target_stage": rpb.MODEL_STAGE_ARCHIVED}, grpc.StatusCode.INVALID_ARGUMENT, "target_stage: expected"),
        ({"force": True}, grpc.StatusCode.INVALID_ARGUMENT, "reason: force promotes over failed gates"),
        ({"version": 0}, grpc.StatusCode.INVALID_ARGUMENT, "version: expected a version number"),
        (
            {"gates": rpb.PromotionGates(latency=rpb.LatencyGate(p99_budget_ms=-1))},
            grpc.StatusCode.INVALID_ARGUMENT,
            "gates.latency.p99_budget_ms",
        ),
    ],
)
def test_bad_promotions_get_the_right_code_naming_the_field(
    stub: pb_grpc.ModelManagerServiceStub, models: Models, fields: dict[str, Any], code: grpc.StatusCode, message: str
) -> None:
    model = f"bad-{uuid.uuid4().hex[:8]}"
    version = upload(stub, model, models.good)
    request = pb.PromoteModelVersionRequest(model_name=model, version=version)
    for name, value in fields.items():
        if isinstance(value, rpb.PromotionGates):
            request.gates.CopyFrom(value)
        else:
            setattr(request, name, value)
    failure = error(lambda: stub.PromoteModelVersion(request))
    assert failure.code() == code
    assert message in (failure.details() or "")
    assert version_of(stub, model, version).stage == rpb.MODEL_STAGE_REGISTERED


def test_an_unknown_operation_is_not_found(stub: pb_grpc.ModelManagerServiceStub) -> None:
    failure = error(lambda: stub.GetOperation(pb.GetOperationRequest(operation_id="nope")))
    assert failure.code() == grpc.StatusCode.NOT_FOUND
    assert "operation_id: no operation 'nope'" in (failure.details() or "")


def test_operations_outlive_the_manager_and_a_crash_fails_the_running_one(
    root: Path, features: ServiceProcess, models: Models
) -> None:
    """A finished operation reads back after a restart; one the crash interrupted is FAILED "manager restarted"
    and its version is back where it was, by the manager's own (audited) hand."""
    args = manager_args(root / "crashing", features)
    process = ServiceProcess("model_manager", args).start()
    try:
        process.wait_healthy(60)
        with grpc.insecure_channel(process.address) as channel:
            stub = pb_grpc.ModelManagerServiceStub(channel)
            finished = wait_done(stub, promote(stub, "crash", upload(stub, "crash", models.good)).operation_id)
            interrupted = upload(stub, "crash", models.good)
            with paused(features):
                running = promote(stub, "crash", interrupted, gates=rpb.PromotionGates(schema=SCHEMA))
                assert process.process is not None
                process.process.kill()  # a crash: no chance to clean up
                process.process.wait(30)
    finally:
        process.stop()
    restarted = ServiceProcess("model_manager", args).start()
    try:
        restarted.wait_healthy(60)
        with grpc.insecure_channel(restarted.address) as channel:
            stub = pb_grpc.ModelManagerServiceStub(channel)
            again = stub.GetOperation(pb.GetOperationRequest(operation_id=finished.operation_id)).operation
            failed = stub.GetOperation(pb.GetOperationRequest(operation_id=running.operation_id)).operation
            stage = version_of(stub, "crash", interrupted).stage
            audit = stub.ListAuditRecords(pb.ListAuditRecordsRequest(model_name="crash", page_size=1)).records
    finally:
        assert restarted.stop() == 0, restarted.output()
    assert again == finished
    assert again.state == rpb.OPERATION_STATE_SUCCEEDED
    assert (failed.state, failed.done) == (rpb.OPERATION_STATE_FAILED, True)
    assert failed.error.startswith("manager restarted")
    assert failed.stage == rpb.MODEL_STAGE_REGISTERED
    assert stage == rpb.MODEL_STAGE_REGISTERED
    assert (audit[0].identity, audit[0].details["from"], audit[0].details["to"]) == (
        "system:model-manager",
        "validating",
        "registered",
    )
    assert audit[0].details["operation_id"] == running.operation_id


def test_with_auth_promote_needs_a_deployer_and_a_force_is_audited_with_its_identity(
    tmp_path: Path, models: Models
) -> None:
    tokens = {"dana": (Role.DEPLOYER, "dana-deployer-token"), "vik": (Role.VIEWER, "vik-viewer-token")}
    (tmp_path / "tokens").write_text("".join(token_line(n, role, t) + "\n" for n, (role, t) in tokens.items()))
    args = ["--data-dir", str(tmp_path / "data"), "--port", "0", "--metrics-port", "-1"]
    process = ServiceProcess("model_manager", [*args, "--auth-tokens-file", str(tmp_path / "tokens")]).start()
    dana = (("authorization", "Bearer dana-deployer-token"),)
    try:
        process.wait_healthy(60)
        with grpc.insecure_channel(process.address) as channel:
            stub = pb_grpc.ModelManagerServiceStub(channel)
            version = upload(stub, "guarded", models.worse, metadata=dana)
            gates = rpb.PromotionGates(backtest=backtest_gate(models.dataset))
            request = pb.PromoteModelVersionRequest(
                model_name="guarded", version=version, gates=gates, force=True, reason="risk accepted, ticket 42"
            )
            missing = error(lambda: stub.PromoteModelVersion(request))
            viewer = error(
                lambda: stub.PromoteModelVersion(request, metadata=(("authorization", "Bearer vik-viewer-token"),))
            )
            started = stub.PromoteModelVersion(request, metadata=dana).operation
            forced = wait_done(stub, started.operation_id)
            audit = stub.ListAuditRecords(pb.ListAuditRecordsRequest(model_name="guarded")).records
    finally:
        assert process.stop() == 0, process.output()
    assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
    assert viewer.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (forced.state, forced.passed, forced.forced) == (rpb.OPERATION_STATE_SUCCEEDED, False, True)
    assert (forced.stage, forced.requested_by) == (rpb.MODEL_STAGE_CANDIDATE, "dana")
    record = next(r for r in audit if r.details.get("to") == "candidate")
    assert (record.identity, record.reason, record.details["forced"]) == ("dana", "risk accepted, ticket 42", "true")
    assert "backtest.auc.min_value" in record.details["failed_gates"]
    assert record.details["gate.backtest.auc.min_value"].startswith("failed: auc 0.5")
    assert "< min_value 0.8" in record.details["gate.backtest.auc.min_value"]
    assert record.details["operation_id"] == forced.operation_id
