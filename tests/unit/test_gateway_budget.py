"""One deadline for the whole call: each hop gets what remains of the caller's budget, 0 means 0,
and a predictor's backpressure reaches the caller as backpressure."""

from __future__ import annotations

import grpc
import pytest
from grpc import aio

from chassis import errors
from chassis.errors import DeadlineExceeded
from chassis.status import peer_error
from fresco.api.common.v1 import values_pb2
from fresco.api.features.v1 import feature_service_pb2 as fpb
from fresco.api.gateway.v1 import gateway_pb2 as gpb
from gateway.budget import Budget
from gateway.pipeline import Query
from tests.unit.gateway_peers import ScriptedFeatures, ScriptedPredictor, Version, running


class Clock:
    """A clock a test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_each_hop_gets_what_remains_of_one_deadline() -> None:
    clock = Clock()
    budget = Budget(2.0, clock)
    assert budget.for_hop("feature service", 5.0) == 2.0
    clock.now += 1.5
    assert budget.for_hop("predictor", 5.0) == pytest.approx(0.5)
    clock.now += 0.5
    with pytest.raises(DeadlineExceeded, match="before predictor could be asked"):
        budget.for_hop("predictor", 5.0)


def test_zero_is_an_expired_deadline_and_none_is_no_deadline() -> None:
    with pytest.raises(DeadlineExceeded):
        Budget(0.0, Clock()).for_hop("predictor", 5.0)
    with pytest.raises(DeadlineExceeded):
        Budget(-0.001, Clock()).for_hop("predictor", 5.0)
    unbounded = Budget(None, Clock())
    assert (unbounded.bounded, unbounded.for_hop("predictor", 5.0)) == (False, 5.0)


async def test_zero_budget_calls_no_peer() -> None:
    async with running() as world:
        query = Query("request", "m", "", {"a": 1.0, "b": 2.0})
        with pytest.raises(DeadlineExceeded):
            await world.gateway.pipeline.predict([query], Budget(0.0))
        assert (world.predictor.metadata_calls, world.predictor.infer_calls) == ([], [])


async def test_predictor_gets_what_the_feature_service_left(monkeypatch: pytest.MonkeyPatch) -> None:
    """The feature service takes 1.5 s of a 5 s budget: the predictor is given at most the 3.5 s
    left, never the caller's whole 5 s again."""
    given: list[tuple[str, float]] = []
    for_hop = Budget.for_hop

    def recording(self: Budget, hop: str, default_s: float) -> float:
        timeout = for_hop(self, hop, default_s)
        given.append((hop.rsplit(" ", 1)[-1], timeout))
        return timeout

    monkeypatch.setattr(Budget, "for_hop", recording)
    predictor = ScriptedPredictor(versions={"1": Version(("v:a", "v:b"))})
    features = ScriptedFeatures(
        answers={"v:a": (1.0, fpb.FEATURE_STATUS_PRESENT), "v:b": (2.0, fpb.FEATURE_STATUS_PRESENT)}, delay_s=1.5
    )
    key = values_pb2.EntityKey(join_keys={"user_id": values_pb2.Value(int64_value=1)})
    async with running(predictor, features) as world:
        response = await world.stub.Predict(gpb.PredictRequest(model="m", entity_keys=[key]), timeout=5.0)
    assert response.outputs["y"].double_values[0] == 1.0 + 10 * 2.0
    assert [hop for hop, _ in given] == ["ModelMetadata", "GetFeatures", "ModelInfer"]
    timeouts = dict(given)  # gRPC rounds the caller's 5 s up a little on the wire: compare hops
    assert timeouts["GetFeatures"] <= timeouts["ModelMetadata"]
    assert timeouts["ModelInfer"] <= timeouts["GetFeatures"] - 1.5
    # What the predictor saw, allowing for gRPC's rounding of the timeout it sends on the wire.
    (_, infer_left), *_ = predictor.infer_calls
    assert infer_left is not None
    assert infer_left < 4.0


async def test_predictor_resource_exhausted_reaches_the_caller() -> None:
    async with running(ScriptedPredictor(fail_infer=grpc.StatusCode.RESOURCE_EXHAUSTED)) as world:
        request = gpb.PredictRequest(model="m", features={"a": values_pb2.Value(double_value=1.0)})
        request.features["b"].double_value = 2.0
        with pytest.raises(aio.AioRpcError) as caught:
            await world.stub.Predict(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "scripted failure" in (caught.value.details() or "")


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
        (grpc.StatusCode.NOT_FOUND, errors.NotFound),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPrecondition),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceeded),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhausted),
        (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
        (grpc.StatusCode.INTERNAL, errors.Unavailable),
        (grpc.StatusCode.UNKNOWN, errors.Unavailable),
    ],
    ids=lambda value: getattr(value, "name", getattr(value, "__name__", "")),
)
def test_peer_status_reaches_the_caller_through_one_table(
    code: grpc.StatusCode, error: type[errors.FrescoError]
) -> None:
    translated = peer_error(code, "queue full", "predictor 127.0.0.1:1")
    assert type(translated) is error
    assert str(translated) == "predictor 127.0.0.1:1: queue full"
