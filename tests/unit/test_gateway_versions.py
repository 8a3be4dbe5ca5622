"""The gateway pins every inference to the version whose signature built its tensors: it asks for
that version by number and refuses an answer from any other."""

from __future__ import annotations

import grpc
import pytest
from grpc import aio

from fresco.api.common.v1 import values_pb2
from fresco.api.gateway.v1 import gateway_pb2 as gpb
from fresco.api.inference import grpc_service_pb2 as pb
from gateway.predictors import version_of
from tests.unit.gateway_peers import ScriptedPredictor, Version, running


def _request(version: str = "", **features: float) -> gpb.PredictRequest:
    values = {name: values_pb2.Value(double_value=v) for name, v in (features or {"a": 1.0, "b": 2.0}).items()}
    return gpb.PredictRequest(model="m", version=version, features=values)


def _y(response: gpb.PredictResponse) -> float:
    return float(response.outputs["y"].double_values[0])


async def test_request_without_version_goes_to_the_default_by_number() -> None:
    predictor = ScriptedPredictor(versions={"1": Version(), "3": Version(("b", "a"))}, default="3")
    async with running(predictor) as world:
        response = await world.stub.Predict(_request(a=1.0, b=2.0), timeout=10)
    (sent, _), *_ = predictor.infer_calls
    assert sent.model_version == "3", "the version is sent explicitly, never left to the predictor"
    assert response.model_version == "3"
    assert _y(response) == 2.0 + 10 * 1.0, "built in version 3's order: b, a"


async def test_answer_from_another_version_is_refused() -> None:
    predictor = ScriptedPredictor(versions={"1": Version(), "2": Version()}, default="1", answer_version="2")
    async with running(predictor) as world:
        with pytest.raises(aio.AioRpcError) as caught:
            await world.stub.Predict(_request(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "version '2'" in (caught.value.details() or "")
    assert "version '1' the request was built for" in (caught.value.details() or "")


async def test_reload_that_reorders_features_is_followed_before_the_cache_expires() -> None:
    """Version 1 (a, b) is replaced by version 2 (b, a) while the gateway holds version 1's
    signature: the predictor refuses version 1, the gateway re-reads the metadata and rebuilds."""
    predictor = ScriptedPredictor(versions={"1": Version(("a", "b"))}, default="1")

    def long_cache(options: dict[str, object]) -> None:
        options["default_version_ttl_s"] = 3600.0

    async with running(predictor, configure=long_cache) as world:
        first = await world.stub.Predict(_request(a=1.0, b=2.0), timeout=10)
        assert (first.model_version, _y(first)) == ("1", 1.0 + 10 * 2.0)
        predictor.versions, predictor.default = {"2": Version(("b", "a"))}, "2"
        second = await world.stub.Predict(_request(a=1.0, b=2.0), timeout=10)
    assert (second.model_version, _y(second)) == ("2", 2.0 + 10 * 1.0)
    assert [request.model_version for request, _ in predictor.infer_calls] == ["1", "1", "2"]


async def test_caller_pinned_version_is_sent_and_its_own_signature_used() -> None:
    predictor = ScriptedPredictor(versions={"1": Version(("a", "b")), "2": Version(("b", "a"))}, default="2")
    async with running(predictor) as world:
        response = await world.stub.Predict(_request("1", a=1.0, b=2.0), timeout=10)
    assert [request.model_version for request, _ in predictor.infer_calls] == ["1"]
    assert (response.model_version, _y(response)) == ("1", 1.0 + 10 * 2.0)


def test_version_of_metadata() -> None:
    named = pb.ModelMetadataResponse(name="m", versions=["1", "2"])
    named.parameters["version"].string_param = "1"
    assert version_of(named, "") == "1"
    # A server that does not name it (Triton) serves its highest version by default.
    assert version_of(pb.ModelMetadataResponse(name="m", versions=["2", "10", "9"]), "") == "10"
    assert version_of(pb.ModelMetadataResponse(name="m", versions=["2", "10"]), "2") == "2"
