"""Fuzzed promotions against the running model manager: every answer is OK or a caller's error with a message, every
accepted promotion finishes with a verdict (never "gates could not run"), and the service stays healthy."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as pb_grpc
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.suite import ServiceProcess
from model_manager.metrics import METRICS
from tests.model_manager.gate_support import Models, train_models, upload, wait_done
from tests.rpc import outcome

pytestmark = pytest.mark.integration

T = TypeVar("T")
CALLER_ERRORS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
}
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
texts = st.text(max_size=30)


def often(good: st.SearchStrategy[T], bad: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """`good` four times in five, so most requests get as far as running their gates."""
    return st.integers(0, 4).flatmap(lambda n: good if n else bad)


limits = st.one_of(st.none(), often(st.floats(0, 2), st.floats(allow_nan=True, allow_infinity=True)))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[pb_grpc.ModelManagerServiceStub, Models]]:
    root = tmp_path_factory.mktemp("gates-fuzz")
    models = train_models(root)
    args = ["--data-dir", str(root / "data"), "--port", "0", "--metrics-port", "-1"]
    process = ServiceProcess("model_manager", args).start()
    try:
        process.wait_healthy(60)
        with grpc.insecure_channel(process.address) as channel:
            stub = pb_grpc.ModelManagerServiceStub(channel)
            yield stub, models
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        assert process.stop() == 0, process.output()


def thresholds(draw: st.DrawFn) -> rpb.MetricThreshold:
    threshold = rpb.MetricThreshold(metric=draw(often(st.sampled_from(METRICS), texts)))
    for name in ("min_value", "max_value", "max_regression", "max_relative_regression"):
        value = draw(limits)
        if value is not None:
            setattr(threshold, name, value)
    return threshold


@st.composite
def gates(draw: st.DrawFn, dataset: str) -> rpb.PromotionGates:
    result = rpb.PromotionGates()
    if draw(st.booleans()):
        result.schema.CopyFrom(
            rpb.SchemaGate(check_feature_refs=draw(st.booleans()), require_output_compatibility=draw(st.booleans()))
        )
    if draw(st.booleans()):
        result.backtest.CopyFrom(
            rpb.BacktestGate(
                dataset_uri=draw(often(st.just(dataset), st.one_of(st.just("memory://nothing"), texts))),
                label_column=draw(often(st.just("label"), st.sampled_from(["country", "s0", "", "nope"]))),
                score_output=draw(st.sampled_from(["", "probabilities", "label", "nope"])),
                slice_column=draw(st.sampled_from(["", "country", "label", "nope"])),
                dataset_sha256=draw(often(st.just(""), st.text("0123456789abcdef", min_size=64, max_size=64))),
                min_slice_rows=draw(often(st.integers(0, 2000), st.integers(-5, -1))),
                thresholds=draw(st.lists(st.composite(lambda d: thresholds(d))(), min_size=1, max_size=3)),
            )
        )
    if draw(st.booleans()):
        result.latency.CopyFrom(
            rpb.LatencyGate(
                p99_budget_ms=draw(often(st.floats(0.001, 1e6), st.floats(allow_nan=True, allow_infinity=True))),
                sample_requests=draw(often(st.integers(0, 50), st.integers(-(2**31), 2**31 - 1))),
                batch_size=draw(often(st.integers(0, 8), st.integers(-5, 10**6))),
            )
        )
    return result


@pytest.fixture(scope="module")
def model(world: tuple[pb_grpc.ModelManagerServiceStub, Models]) -> str:
    stub, models = world
    name = f"fuzz-{uuid.uuid4().hex[:6]}"
    upload(stub, name, models.good)
    upload(stub, name, models.worse)
    return name


@FUZZ
@given(data=st.data())
def test_promotions_never_fail_internally(
    world: tuple[pb_grpc.ModelManagerServiceStub, Models], model: str, data: st.DataObject
) -> None:
    stub, models = world
    request = pb.PromoteModelVersionRequest(
        model_name=data.draw(often(st.just(model), st.sampled_from(["", "nope", "a b", "a\x00b"]))),
        version=data.draw(often(st.sampled_from([1, 2]), st.integers(-(2**63), 2**63 - 1))),
        target_stage=data.draw(often(st.sampled_from([0, 3, 4]), st.integers(-1, 8))),
        dry_run=data.draw(often(st.just(True), st.just(False))),
        reason=data.draw(often(st.text(min_size=1, max_size=30), st.one_of(st.just(""), st.just("x" * 5000)))),
        force=data.draw(st.booleans()),
    )
    if data.draw(often(st.just(True), st.just(False))):
        request.gates.CopyFrom(data.draw(gates(models.dataset.as_uri())))
    started: list[rpb.Operation] = []
    code = outcome(lambda: started.append(stub.PromoteModelVersion(request, timeout=30).operation))
    assert code in CALLER_ERRORS
    if started:
        operation = wait_done(stub, started[0].operation_id)
        assert not operation.error.startswith("gates could not run"), operation.error
        if not operation.dry_run and operation.stage != rpb.MODEL_STAGE_REJECTED:
            assert operation.stage in (rpb.MODEL_STAGE_CANDIDATE, rpb.MODEL_STAGE_PRODUCTION)


@FUZZ
@given(operation_id=st.one_of(texts, st.text(max_size=100), st.just("a" * 32)))
def test_operation_reads_never_fail_internally(
    world: tuple[pb_grpc.ModelManagerServiceStub, Models], operation_id: str
) -> None:
    stub, _ = world
    assert outcome(lambda: stub.GetOperation(pb.GetOperationRequest(operation_id=operation_id), timeout=30)) in (
        CALLER_ERRORS
    )
    watch = pb.WatchOperationRequest(operation_id=operation_id)
    assert outcome(lambda: list(stub.WatchOperation(watch, timeout=30))) in CALLER_ERRORS
