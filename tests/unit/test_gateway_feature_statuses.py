"""The gateway reads each fetched feature's status, not only its value: an unreadable store is
UNAVAILABLE naming the view, a value the null policy could not supply is FAILED_PRECONDITION naming
the entity and the feature, and an imputed value is served and reported."""

from __future__ import annotations

import grpc
import pytest
from grpc import aio

from fresco.api.common.v1 import values_pb2
from fresco.api.features.v1 import feature_service_pb2 as fpb
from fresco.api.gateway.v1 import gateway_pb2 as gpb
from tests.unit.gateway_peers import ScriptedFeatures, ScriptedPredictor, Version, running

REFS = ("stats:a", "stats:b")
PRESENT = fpb.FEATURE_STATUS_PRESENT


def _predictor() -> ScriptedPredictor:
    return ScriptedPredictor(versions={"1": Version(REFS)})


def _by_user(user_id: int = 7) -> gpb.PredictRequest:
    key = values_pb2.EntityKey(join_keys={"user_id": values_pb2.Value(int64_value=user_id)})
    return gpb.PredictRequest(model="m", entity_keys=[key])


async def _failure(features: ScriptedFeatures) -> aio.AioRpcError:
    async with running(_predictor(), features) as world:
        with pytest.raises(aio.AioRpcError) as caught:
            await world.stub.Predict(_by_user(), timeout=10)
    return caught.value


async def test_unreadable_store_is_unavailable_naming_the_view() -> None:
    err = await _failure(
        ScriptedFeatures(answers={"stats:a": (None, fpb.FEATURE_STATUS_UNAVAILABLE), "stats:b": (2.0, PRESENT)})
    )
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "feature view 'stats' is unavailable" in (err.details() or "")


async def test_unavailable_view_is_reported_before_a_missing_value() -> None:
    err = await _failure(
        ScriptedFeatures(
            answers={
                "stats:a": (None, fpb.FEATURE_STATUS_NOT_FOUND),
                "stats:b": (None, fpb.FEATURE_STATUS_UNAVAILABLE),
            }
        )
    )
    assert err.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (fpb.FEATURE_STATUS_NOT_FOUND, "nothing is stored for it"),
        (fpb.FEATURE_STATUS_EXPIRED, "older than the view's TTL"),
        (fpb.FEATURE_STATUS_NULL, "its stored value is null"),
        (fpb.FEATURE_STATUS_REJECTED, "rejects missing values"),
    ],
    ids=["not_found", "expired", "null", "rejected"],
)
async def test_value_the_policy_cannot_supply_fails_precondition(status: int, reason: str) -> None:
    err = await _failure(ScriptedFeatures(answers={"stats:a": (1.0, PRESENT), "stats:b": (None, status)}))
    details = err.details() or ""
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "entity user_id=7" in details
    assert "feature 'stats:b'" in details
    assert reason in details


async def test_imputed_values_are_served_and_reported() -> None:
    features = ScriptedFeatures(answers={"stats:a": (1.0, PRESENT), "stats:b": (0.5, fpb.FEATURE_STATUS_IMPUTED)})
    async with running(_predictor(), features) as world:
        response = await world.stub.Predict(_by_user(), timeout=10)
    assert response.outputs["y"].double_values[0] == 1.0 + 10 * 0.5
    assert list(response.imputed_features) == ["stats:b"]
    assert response.degraded is True


async def test_fallback_tier_marks_the_answer_degraded() -> None:
    features = ScriptedFeatures(answers={"stats:a": (1.0, PRESENT), "stats:b": (2.0, PRESENT)}, degraded=True)
    async with running(_predictor(), features) as world:
        response = await world.stub.Predict(_by_user(), timeout=10)
    assert (list(response.imputed_features), response.degraded) == ([], True)


async def test_present_values_are_not_degraded() -> None:
    features = ScriptedFeatures(answers={"stats:a": (1.0, PRESENT), "stats:b": (2.0, PRESENT)})
    async with running(_predictor(), features) as world:
        response = await world.stub.Predict(_by_user(), timeout=10)
    assert response.outputs["y"].double_values[0] == 21.0
    assert (list(response.imputed_features), response.degraded) == ([], False)
