"""Concurrent inference calls merged into one ModelInfer (`gateway.coalesce`): every request gets exactly its own
rows' answer, keeps its own deadline, and one refused row fails only its own request."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from chassis.errors import DeadlineExceeded, InvalidArgument, Unavailable
from fresco.api.common.v1 import values_pb2
from fresco.api.gateway.v1 import gateway_pb2 as gpb
from fresco.api.inference import grpc_service_pb2 as pb
from gateway.assembly import ModelSignature
from gateway.coalesce import Coalescer, Key, split_response
from tests.unit.gateway_peers import ScriptedPredictor, Version, running

KEY: Key = ("predictor:1", "pinned", ())
BAD = -1.0  # a row holding this value is refused by the scripted model


class Model:
    """y = 2x + 1 per row, (x, x²) as a second output; each call after a release of `gate`, recorded."""

    def __init__(self) -> None:
        self.calls: list[int] = []  # rows per call
        self.gate = asyncio.Event()
        self.fail: Exception | None = None

    async def send(self, key: Key, inputs: Mapping[str, np.ndarray], timeout_s: float) -> pb.ModelInferResponse:
        x = inputs["x"]
        self.calls.append(len(x))
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        if (x == BAD).any():
            raise InvalidArgument("input x: value -1 is out of range")
        response = pb.ModelInferResponse(model_name="m", model_version="1")
        y = (2 * x + 1).astype("<f4")
        response.outputs.add(name="y", datatype="FP32", shape=[len(x), 1])
        response.raw_output_contents.append(y.tobytes())
        pair = np.concatenate([x, x * x], axis=1).astype("<f8")
        response.outputs.add(name="pair", datatype="FP64", shape=[len(x), 2])
        response.raw_output_contents.append(pair.tobytes())
        return response


def _x(*values: float) -> dict[str, np.ndarray]:
    return {"x": np.asarray(values, dtype=np.float32).reshape(-1, 1)}


def _y(response: pb.ModelInferResponse) -> list[float]:
    return [float(v) for v in np.frombuffer(response.raw_output_contents[0], dtype="<f4")]


def _pairs(response: pb.ModelInferResponse) -> list[float]:
    return [float(v) for v in np.frombuffer(response.raw_output_contents[1], dtype="<f8")]


async def _started(
    coalescer: Coalescer, model: Model, values: tuple[float, ...], timeout_s: float = 10.0
) -> asyncio.Future[pb.ModelInferResponse]:
    task = asyncio.ensure_future(coalescer.infer(KEY, _x(*values), len(values), timeout_s, "predictor p"))
    await asyncio.sleep(0)
    return task


async def test_requests_waiting_behind_a_call_go_as_one_and_get_their_own_rows() -> None:
    model = Model()
    registry = CollectorRegistry()
    coalescer = Coalescer(model.send, in_flight=1, max_rows=100, registry=registry)
    first = await _started(coalescer, model, (1.0,))
    waiting = [await _started(coalescer, model, values) for values in ((2.0,), (3.0, 4.0), (5.0,))]
    assert model.calls == [1], "the first call left at once; the others wait for it"
    model.gate.set()
    answers = await asyncio.gather(first, *waiting)
    assert model.calls == [1, 4], "the three waiting requests (four rows) went as one call"
    assert [_y(a) for a in answers] == [[3.0], [5.0], [7.0, 9.0], [11.0]]
    assert _pairs(answers[2]) == [3.0, 9.0, 4.0, 16.0]
    assert [list(a.outputs[1].shape) for a in answers] == [[1, 2], [1, 2], [2, 2], [1, 2]]
    assert registry.get_sample_value("fresco_gateway_merged_requests_total") == 3
    assert registry.get_sample_value("fresco_gateway_merged_calls_total") == 1


async def test_a_lone_request_never_waits() -> None:
    model = Model()
    model.gate.set()
    coalescer = Coalescer(model.send, in_flight=1, max_rows=100)
    assert _y(await coalescer.infer(KEY, _x(7.0), 1, 10.0, "p")) == [15.0]
    assert _y(await coalescer.infer(KEY, _x(8.0), 1, 10.0, "p")) == [17.0]
    assert model.calls == [1, 1]


async def test_a_merged_call_carries_at_most_max_rows() -> None:
    model = Model()
    coalescer = Coalescer(model.send, in_flight=1, max_rows=3)
    first = await _started(coalescer, model, (0.0,))
    waiting = [await _started(coalescer, model, (float(v), float(v))) for v in range(1, 4)]
    model.gate.set()
    answers = await asyncio.gather(first, *waiting)
    assert model.calls == [1, 2, 2, 2], "two rows each: a third request would exceed three rows"
    assert [_y(a) for a in answers[1:]] == [[3.0, 3.0], [5.0, 5.0], [7.0, 7.0]]


async def test_a_refused_row_fails_only_its_own_request() -> None:
    model = Model()
    coalescer = Coalescer(model.send, in_flight=1, max_rows=100)
    first = await _started(coalescer, model, (1.0,))
    good, bad, other = [await _started(coalescer, model, v) for v in ((2.0,), (BAD,), (3.0,))]
    model.gate.set()
    assert _y(await first) == [3.0]
    assert _y(await good) == [5.0]
    assert _y(await other) == [7.0]
    with pytest.raises(InvalidArgument, match="out of range"):
        await bad
    assert model.calls == [1, 3, 1, 1, 1], "the refused merged call was asked again request by request"


async def test_a_failed_merged_call_fails_every_request_in_it() -> None:
    model = Model()
    coalescer = Coalescer(model.send, in_flight=1, max_rows=100)
    first = await _started(coalescer, model, (1.0,))
    waiting = [await _started(coalescer, model, (v,)) for v in (2.0, 3.0)]
    model.fail = Unavailable("predictor p: connection refused")
    model.gate.set()
    for task in (first, *waiting):
        with pytest.raises(Unavailable, match="connection refused"):
            await task
    assert model.calls == [1, 2]


async def test_each_request_keeps_its_own_deadline_and_leaving_cancels_no_one() -> None:
    model = Model()
    coalescer = Coalescer(model.send, in_flight=1, max_rows=100)
    first = await _started(coalescer, model, (1.0,))
    hasty = await _started(coalescer, model, (2.0,), timeout_s=0.05)
    leaving = await _started(coalescer, model, (3.0,))
    patient = await _started(coalescer, model, (4.0,))
    with pytest.raises(DeadlineExceeded, match="deadline"):
        await hasty
    leaving.cancel()
    await asyncio.sleep(0)
    model.gate.set()
    assert _y(await first) == [3.0]
    assert _y(await patient) == [9.0]
    assert model.calls == [1, 1], "the requests that left were never sent"
    assert leaving.cancelled()


def test_an_output_without_one_row_per_request_is_refused() -> None:
    response = pb.ModelInferResponse(model_name="m", model_version="1")
    response.outputs.add(name="bias", datatype="FP32", shape=[2])
    response.raw_output_contents.append(np.zeros(2, dtype="<f4").tobytes())
    with pytest.raises(Unavailable, match="not one row per request"):
        split_response(response, [1, 2], "predictor p")


def test_only_versions_whose_tensors_all_carry_a_batch_dimension_are_merged() -> None:
    metadata = pb.ModelMetadataResponse(name="m")
    metadata.inputs.add(name="x", datatype="FP32", shape=[-1, 4])
    metadata.outputs.add(name="y", datatype="FP32", shape=[-1])
    assert ModelSignature.from_metadata(metadata).mergeable
    fixed = pb.ModelMetadataResponse()
    fixed.CopyFrom(metadata)
    fixed.outputs.add(name="bias", datatype="FP32", shape=[3])
    assert not ModelSignature.from_metadata(fixed).mergeable
    text = pb.ModelMetadataResponse()
    text.CopyFrom(metadata)
    text.inputs.add(name="t", datatype="BYTES", shape=[-1])
    assert not ModelSignature.from_metadata(text).mergeable


def _request(a: float, b: float) -> gpb.PredictRequest:
    values = {"a": values_pb2.Value(double_value=a), "b": values_pb2.Value(double_value=b)}
    return gpb.PredictRequest(model="m", features=values)


async def test_concurrent_predicts_through_the_gateway_are_merged_and_answered_row_by_row() -> None:
    predictor = ScriptedPredictor(versions={"1": Version()}, infer_delay_s=0.05)
    async with running(predictor) as world:
        rows = [(float(i), float(i % 3)) for i in range(12)]
        answers = await asyncio.gather(*(world.stub.Predict(_request(a, b), timeout=10) for a, b in rows))
    assert [a.outputs["y"].double_values[0] for a in answers] == [a + 10 * b for a, b in rows]
    assert len(predictor.infer_calls) < len(rows), "requests waiting behind a call went together"
    assert sum(len(np.frombuffer(r.raw_input_contents[0], "<f8")) // 2 for r, _ in predictor.infer_calls) == len(rows)


async def test_merging_off_sends_each_request_on_its_own() -> None:
    predictor = ScriptedPredictor(versions={"1": Version()}, infer_delay_s=0.02)

    def off(options: dict[str, object]) -> None:
        options["merge_in_flight"] = 0

    async with running(predictor, configure=off) as world:
        rows = [(float(i), 1.0) for i in range(6)]
        answers = await asyncio.gather(*(world.stub.Predict(_request(a, b), timeout=10) for a, b in rows))
    assert [a.outputs["y"].double_values[0] for a in answers] == [a + 10 * b for a, b in rows]
    assert len(predictor.infer_calls) == len(rows)


async def test_a_caller_mistake_in_a_merged_call_reaches_only_that_caller() -> None:
    predictor = ScriptedPredictor(versions={"1": Version()}, infer_delay_s=0.05, refuse_value=-7.0)
    async with running(predictor) as world:
        calls = [world.stub.Predict(_request(float(i), -7.0 if i == 4 else 0.0), timeout=10) for i in range(8)]
        results = await asyncio.gather(*calls, return_exceptions=True)
    failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert failed == [4]
    error = results[4]
    assert isinstance(error, grpc.aio.AioRpcError)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [r.outputs["y"].double_values[0] for r in results if isinstance(r, gpb.PredictResponse)] == [
        float(i) for i in range(8) if i != 4
    ]


async def test_with_two_in_flight_the_third_and_later_requests_wait_for_either() -> None:
    model = Model()
    coalescer = Coalescer(model.send, in_flight=2, max_rows=100)
    first, second = [await _started(coalescer, model, (v,)) for v in (1.0, 2.0)]
    waiting = [await _started(coalescer, model, (v,)) for v in (3.0, 4.0, 5.0)]
    assert model.calls == [1, 1], "two calls on their way, the other requests wait"
    model.gate.set()
    answers = await asyncio.gather(first, second, *waiting)
    assert [_y(a) for a in answers] == [[3.0], [5.0], [7.0], [9.0], [11.0]]
    assert model.calls == [1, 1, 3], "the first call to end took all three waiting requests"


async def test_requests_whose_tensors_differ_beyond_the_batch_dimension_are_not_merged_together() -> None:
    """A version with a variable second dimension (a list feature, say): requests of different widths cannot share
    one tensor. Each still gets its own answer; only requests of one width travel together."""
    model = Model()
    coalescer = Coalescer(model.send, in_flight=1, max_rows=100)
    first = await _started(coalescer, model, (1.0,))

    def started(row: list[float]) -> asyncio.Future[pb.ModelInferResponse]:
        x = {"x": np.asarray([row], dtype=np.float32)}
        return asyncio.ensure_future(coalescer.infer(KEY, x, 1, 10.0, "predictor p"))

    narrow, wide, narrow_too = started([2.0]), started([3.0, 4.0]), started([5.0])
    await asyncio.sleep(0)
    model.gate.set()
    assert _y(await first) == [3.0]
    assert _y(await narrow) == [5.0]
    assert _y(await wide) == [7.0, 9.0]
    assert _y(await narrow_too) == [11.0]
    assert sorted(model.calls[1:]) == [1, 2], "the two narrow requests went together, the wide one alone"


async def test_merged_calls_stay_within_the_message_size_each_request_fits_in() -> None:
    """Requests that each fit the gateway's max message size are never merged into a call that does not: the
    merged call would be refused (RESOURCE_EXHAUSTED) and fail every request in it."""
    names = tuple(f"f{i}" for i in range(40))
    predictor = ScriptedPredictor(versions={"1": Version(features=names)}, infer_delay_s=0.2)

    def small_messages(options: dict[str, object]) -> None:
        options["max_message_bytes"] = 2048  # one request's call is ~0.6 KB; twelve rows would be ~4 KB

    def request(i: int) -> gpb.PredictRequest:
        values = {name: values_pb2.Value(double_value=float(j == i % 40)) for j, name in enumerate(names)}
        return gpb.PredictRequest(model="m", features=values)

    async with running(predictor, configure=small_messages) as world:
        results = await asyncio.gather(
            *(world.stub.Predict(request(i), timeout=10) for i in range(12)), return_exceptions=True
        )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:1]
    assert [r.outputs["y"].double_values[0] for r in results if isinstance(r, gpb.PredictResponse)] == [
        10.0 ** (i % 40) for i in range(12)
    ]
    assert len(predictor.infer_calls) < 12, "requests still went together, a few at a time"
    assert max(r.ByteSize() for r, _ in predictor.infer_calls) <= 2048


async def test_a_merged_call_counts_its_answer_rows_at_the_size_earlier_answers_had() -> None:
    """Four bytes of input per row but twenty of answer: a merged call is sized by both."""
    model = Model()
    coalescer = Coalescer(model.send, in_flight=1, max_rows=100, max_bytes=50)
    first = await _started(coalescer, model, (1.0,))
    waiting = [await _started(coalescer, model, (float(v),)) for v in range(2, 6)]
    model.gate.set()
    answers = await asyncio.gather(first, *waiting)
    assert [_y(a) for a in answers] == [[3.0], [5.0], [7.0], [9.0], [11.0]]
    assert model.calls == [1, 2, 2], "24 bytes a request: two fit in 50"


async def test_the_caller_whose_call_the_others_wait_behind_leaving_sends_them_at_once() -> None:
    model = Model()
    coalescer = Coalescer(model.send, in_flight=1, max_rows=100)
    first = await _started(coalescer, model, (1.0,))
    waiting = [await _started(coalescer, model, (v,)) for v in (2.0, 3.0)]
    first.cancel()
    for _ in range(3):  # the cancelled caller ends, then the merged call starts
        await asyncio.sleep(0)
    assert model.calls == [1, 2], "the waiting requests left as the call they waited for was cancelled"
    model.gate.set()
    assert [_y(await w) for w in waiting] == [[5.0], [7.0]]
    assert first.cancelled()
