"""Bounded work per call: too many predictions in one PredictBatch, or too many strings in one
feature or one BYTES tensor, are INVALID_ARGUMENT naming the setting; a large call is decoded off
the event loop, so small calls keep completing meanwhile."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc import aio

from fresco.api.common.v1 import values_pb2
from fresco.api.gateway.v1 import gateway_pb2 as gpb
from gateway.pipeline import Query
from tests.unit.gateway_peers import ScriptedPredictor, Version, running


def _echo_predictor() -> ScriptedPredictor:
    return ScriptedPredictor(versions={"1": Version(("a", "b")), "2": Version(echo=True)})


def _text(text: str, request_id: str = "") -> gpb.PredictRequest:
    request = gpb.PredictRequest(model="m", version="2", request_id=request_id)
    request.features["text"].string_value = text
    return request


def _small() -> gpb.PredictRequest:
    return gpb.PredictRequest(
        model="m",
        version="1",
        features={"a": values_pb2.Value(double_value=1.0), "b": values_pb2.Value(double_value=2.0)},
    )


def _limits(**limits: int) -> Any:
    def configure(options: dict[str, Any]) -> None:
        options.update(limits)

    return configure


async def test_batch_over_max_batch_requests_is_invalid_argument() -> None:
    predictor = _echo_predictor()
    async with running(predictor, configure=_limits(max_batch_requests=3)) as world:
        ok = await world.stub.PredictBatch(gpb.PredictBatchRequest(requests=[_text("x")] * 3), timeout=10)
        assert len(ok.responses) == 3
        with pytest.raises(aio.AioRpcError) as caught:
            await world.stub.PredictBatch(gpb.PredictBatchRequest(requests=[_text("x")] * 4), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "4 predictions" in (caught.value.details() or "")
    assert "max_batch_requests" in (caught.value.details() or "")
    assert len(predictor.infer_calls) == 1, "the refused batch reached no predictor"


async def test_string_list_over_max_bytes_elements_is_invalid_argument() -> None:
    predictor = _echo_predictor()
    request = gpb.PredictRequest(model="m", version="2")
    request.features["text"].string_list.values.extend([""] * 6)
    async with running(predictor, configure=_limits(max_bytes_elements=5)) as world:
        with pytest.raises(aio.AioRpcError) as caught:
            await world.stub.Predict(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "features['text']: more than 5 string elements" in (caught.value.details() or "")
    assert "max_bytes_elements" in (caught.value.details() or "")
    assert predictor.metadata_calls == []
    assert predictor.infer_calls == []


async def test_bytes_tensor_over_max_bytes_elements_is_invalid_argument() -> None:
    predictor = _echo_predictor()
    async with running(predictor, configure=_limits(max_bytes_elements=5)) as world:
        five = await world.stub.PredictBatch(gpb.PredictBatchRequest(requests=[_text("x")] * 5), timeout=10)
        assert [list(r.outputs["echo"].bytes_values) for r in five.responses] == [[b"x"]] * 5
        with pytest.raises(aio.AioRpcError) as caught:
            await world.stub.PredictBatch(gpb.PredictBatchRequest(requests=[_text("x")] * 6), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'text': 6 string elements" in (caught.value.details() or "")
    assert len(predictor.infer_calls) == 1


async def test_small_calls_complete_while_a_large_batch_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway and this test share one event loop: a decode that held it would let no small
    call finish between the large batch's first and last decoded request."""
    size = 100_000
    completed = 0
    seen: dict[str, int] = {}
    decode = Query.from_proto.__func__  # type: ignore[attr-defined]

    def spy(cls: type[Query], request: gpb.PredictRequest, label: str, *args: Any) -> Query:
        if label == "requests[0]":
            seen["first"] = completed
        query: Query = decode(cls, request, label, *args)
        if label == f"requests[{size - 1}]":
            seen["last"] = completed
        return query

    monkeypatch.setattr(Query, "from_proto", classmethod(spy))
    large = gpb.PredictBatchRequest(requests=[_text("", request_id=str(i)) for i in range(size)])
    async with running(_echo_predictor(), configure=_limits(max_batch_requests=size, max_bytes_elements=size)) as world:
        answer = asyncio.ensure_future(world.stub.PredictBatch(large, timeout=120))
        while not answer.done():
            small = await world.stub.Predict(_small(), timeout=120)
            assert small.outputs["y"].double_values[0] == 21.0
            completed += 1
        response = await answer
    assert len(response.responses) == size
    assert [r.request_id for r in response.responses[:3]] == ["0", "1", "2"]
    assert response.responses[-1].request_id == str(size - 1)
    assert seen["last"] - seen["first"] > 0, "no small call completed while the large batch was decoded"
