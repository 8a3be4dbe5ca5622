"""Concurrent inference calls to one predictor version merged into one ModelInfer: while `in_flight` calls for
the same (endpoint, pinned version, outputs) are on their way, further requests wait, and the next call carries
all of them at once, its answer split back per request. One call instead of many is most of what a gateway
request costs (the gRPC call on both sides), and the predictor runs the rows as one batch, as its own batcher
would. Nothing waits while there is room: a lone request is sent at once.

Each request keeps its own deadline (the merged call runs until the latest of them), leaving does not cancel the
others, and a merged call the predictor refuses as INVALID_ARGUMENT is asked again request by request, so one bad
row fails only its own request. A merged call carries at most max_rows rows and about max_bytes bytes (its inputs, and
the answer's rows at the size earlier answers had), so requests that each fit a message never make one that does
not. Only versions whose metadata gives every input and output a batch dimension and
no BYTES tensor are merged (`ModelSignature.mergeable`): their answers split by rows exactly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from prometheus_client import CollectorRegistry, Counter

from chassis.errors import DeadlineExceeded, FrescoError, InvalidArgument, Unavailable
from fresco.api.inference import grpc_service_pb2 as pb

Key = tuple[str, object, tuple[str, ...]]  # endpoint, pinned version, outputs asked for
Send = Callable[[Key, Mapping[str, np.ndarray], float], Awaitable[pb.ModelInferResponse]]
_LEAST_TIMEOUT_S: Final = 0.001
DEFAULT_MAX_BYTES: Final = 32 << 20  # half the default max message size: room for the request's other fields


@dataclass(eq=False)
class _Waiting:
    inputs: Mapping[str, np.ndarray]
    rows: int
    deadline: float
    answer: asyncio.Future[pb.ModelInferResponse]
    layout: tuple[tuple[str, str, tuple[int, ...]], ...]  # each input's dtype and shape past the batch dimension
    nbytes: int  # of the inputs


def _layout(inputs: Mapping[str, np.ndarray]) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    """What requests must share to travel in one tensor: each input's dtype and shape beyond its rows."""
    return tuple((name, array.dtype.str, array.shape[1:]) for name, array in inputs.items())


def split_response(response: pb.ModelInferResponse, sizes: Sequence[int], what: str) -> list[pb.ModelInferResponse]:
    """One answer per request of a merged call, `sizes[i]` rows each, every output sliced by rows."""
    total = sum(sizes)
    parts = [pb.ModelInferResponse(model_name=response.model_name, model_version=response.model_version) for _ in sizes]
    for index, tensor in enumerate(response.outputs):
        shape = list(tensor.shape)
        raw = response.raw_output_contents[index] if index < len(response.raw_output_contents) else b""
        if tensor.datatype == "BYTES" or not shape or shape[0] != total or len(raw) % total:
            raise Unavailable(
                f"{what} answered a call of {total} rows with output {tensor.name!r} of shape {shape} "
                f"({len(raw)} bytes, {tensor.datatype}), not one row per request"
            )
        row_bytes = len(raw) // total
        offset = 0
        for part, size in zip(parts, sizes, strict=True):
            part.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=[size, *shape[1:]])
            part.raw_output_contents.append(raw[offset * row_bytes : (offset + size) * row_bytes])
            offset += size
    return parts


class Coalescer:
    """Merges concurrent calls per key once `in_flight` calls for that key are on their way."""

    def __init__(
        self,
        send: Send,
        in_flight: int,
        max_rows: int,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self._send = send
        self._in_flight = in_flight
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        self._answer_row_bytes: dict[Key, int] = {}  # per key, the most bytes an answer's row took
        self._clock = clock
        self._running: dict[Key, int] = {}
        self._waiting: dict[Key, list[_Waiting]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        registry = registry or CollectorRegistry()
        self.calls = Counter(
            "fresco_gateway_merged_calls",
            "ModelInfer calls carrying the requests of several callers.",
            registry=registry,
        )
        self.merged = Counter(
            "fresco_gateway_merged_requests", "Requests answered through a merged ModelInfer call.", registry=registry
        )

    async def infer(
        self, key: Key, inputs: Mapping[str, np.ndarray], rows: int, timeout_s: float, what: str
    ) -> pb.ModelInferResponse:
        """The answer to `inputs` (`rows` rows), sent alone when there is room, else with the requests waiting."""
        if self._running.get(key, 0) < self._in_flight:
            self._running[key] = self._running.get(key, 0) + 1
            try:
                return self._learned(key, rows, await self._send(key, inputs, timeout_s))
            finally:
                self._finished(key)
        loop = asyncio.get_running_loop()
        nbytes = sum(array.nbytes for array in inputs.values())
        waiting = _Waiting(inputs, rows, self._clock() + timeout_s, loop.create_future(), _layout(inputs), nbytes)
        self._waiting.setdefault(key, []).append(waiting)
        # The deadline fails this request's own future (a caller leaving cancels it): the call carrying it goes on.
        expiry = loop.call_later(timeout_s, _expire, waiting.answer, what)
        try:
            return await waiting.answer
        finally:
            expiry.cancel()
            queue = self._waiting.get(key)
            if queue is not None and waiting in queue:  # left before it was sent: never will be
                queue.remove(waiting)

    def _finished(self, key: Key) -> None:
        """A call for `key` ended: send the requests waiting for it, as one call."""
        self._running[key] -= 1
        queue = self._waiting.get(key)
        if not queue or self._running[key] >= self._in_flight:
            if not self._running[key] and not queue:
                del self._running[key]
                self._waiting.pop(key, None)
                self._answer_row_bytes.pop(key, None)
            return
        # The oldest request and those after it that fit: the same tensor layout (a variable dimension past the
        # rows may differ between requests), within max_rows and max_bytes; the others keep their place for the
        # next call.
        answer_row = self._answer_row_bytes.get(key, 0)
        batch = [queue.pop(0)]
        rows = batch[0].rows
        size = batch[0].nbytes + rows * answer_row
        for waiting in list(queue):
            more = waiting.nbytes + waiting.rows * answer_row
            fits = rows + waiting.rows <= self._max_rows and size + more <= self._max_bytes
            if waiting.layout == batch[0].layout and fits:
                queue.remove(waiting)
                batch.append(waiting)
                rows += waiting.rows
                size += more
        self._running[key] += 1
        task = asyncio.ensure_future(self._send_merged(key, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_merged(self, key: Key, batch: list[_Waiting]) -> None:
        try:
            await self._answer(key, batch)
        except BaseException as err:
            for waiting in batch:
                if not waiting.answer.done():
                    waiting.answer.set_exception(err if isinstance(err, Exception) else Unavailable("call stopped"))
            if not isinstance(err, Exception):
                raise
        finally:
            self._finished(key)

    async def _answer(self, key: Key, batch: list[_Waiting]) -> None:
        live = [w for w in batch if not w.answer.done()]
        if not live:
            return
        timeout_s = max(_LEAST_TIMEOUT_S, max(w.deadline for w in live) - self._clock())
        if len(live) == 1:
            _settle(live[0], self._learned(key, live[0].rows, await self._send(key, live[0].inputs, timeout_s)))
            return
        self.calls.inc()
        self.merged.inc(len(live))
        names = list(live[0].inputs)
        merged = {name: np.concatenate([w.inputs[name] for w in live]) for name in names}
        try:
            response = await self._send(key, merged, timeout_s)
        except InvalidArgument:
            # One request's rows may be the cause: each is asked alone, for its own answer or refusal.
            await asyncio.gather(*(self._alone(key, w) for w in live))
            return
        self._learned(key, sum(w.rows for w in live), response)
        for waiting, part in zip(
            live, split_response(response, [w.rows for w in live], f"predictor {key[0]}"), strict=True
        ):
            _settle(waiting, part)

    async def _alone(self, key: Key, waiting: _Waiting) -> None:
        try:
            response = await self._send(key, waiting.inputs, max(_LEAST_TIMEOUT_S, waiting.deadline - self._clock()))
        except FrescoError as err:
            if not waiting.answer.done():
                waiting.answer.set_exception(err)
            return
        _settle(waiting, response)

    def _learned(self, key: Key, rows: int, response: pb.ModelInferResponse) -> pb.ModelInferResponse:
        """`response`, its bytes per row noted for the size of the next merged calls of `key`."""
        if rows:
            row_bytes = -(-sum(len(raw) for raw in response.raw_output_contents) // rows)
            if row_bytes > self._answer_row_bytes.get(key, 0):
                self._answer_row_bytes[key] = row_bytes
        return response

    async def close(self) -> None:
        """Let merged calls on their way finish."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _expire(answer: asyncio.Future[pb.ModelInferResponse], what: str) -> None:
    if not answer.done():
        answer.set_exception(DeadlineExceeded(f"{what} ModelInfer: the call's deadline passed waiting for the answer"))


def _settle(waiting: _Waiting, response: pb.ModelInferResponse) -> None:
    if not waiting.answer.done():
        waiting.answer.set_result(response)
