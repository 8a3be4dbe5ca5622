"""Dynamic batching: requests for one model version queue here and run together.

Two promises, against the two known complaints about Python batchers:
- a batch never waits longer than `max_queue_delay` counted from the arrival of its oldest request
  (the clock starts when the request arrives, not when the batcher looks at it);
- an idle model never makes a request wait: the batcher only waits for companions it can expect,
  judged by how many requests were outstanding at once recently. At concurrency 1 that is one,
  so a lone request is dispatched at once, and batching costs it nothing.

With `max_queue_delay` 0 (the default) batches form only from what queued while every execution
slot was busy, which is also what keeps a loaded server efficient.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field

import numpy as np

from chassis.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable

Arrays = dict[str, np.ndarray]
Runner = Callable[[Mapping[str, np.ndarray]], Arrays]

# How long a burst of concurrency is remembered when deciding whether to wait for companions.
PEAK_WINDOW_S = 0.5
# Batch sizes whose compute time is tracked for running small batches inline.
MAX_TRACKED_SIZES = 1024


@dataclass(frozen=True)
class BatchPolicy:
    """How one model version batches."""

    max_batch_size: int
    max_queue_delay_s: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 1024
    instances: int = 1
    # Batches whose recent compute time is below this run on the event loop: handing them to a
    # thread and back costs more than running them (0 keeps every batch off the loop).
    inline_below_ns: int = 0


@dataclass
class Request:
    """One queued request and, once it ran, when it left the queue and when its batch finished."""

    inputs: Mapping[str, np.ndarray]
    rows: int
    trailing: tuple[tuple[str, str, tuple[int, ...]], ...]
    future: asyncio.Future[Arrays]
    arrived_ns: int
    deadline: float | None
    dispatched_ns: int = 0
    finished_ns: int = 0
    result: Arrays = field(default_factory=dict)


@dataclass
class Execution:
    """What an observer learns of one batch."""

    rows: int
    requests: Sequence[Request]
    compute_ns: int  # from dispatch to answers set: input preparation, the model, output slicing
    failed: bool
    infer_ns: int = 0  # the model run alone
    input_ns: int = 0  # joining the requests' inputs


@dataclass
class _Peak:
    """The most requests outstanding at once over the last two windows."""

    current: int = 0
    previous: int = 0
    window_start: float = field(default_factory=time.monotonic)

    def observe(self, outstanding: int, now: float) -> None:
        if now - self.window_start > PEAK_WINDOW_S:
            self.previous = self.current if now - self.window_start < 2 * PEAK_WINDOW_S else 0
            self.current = 0
            self.window_start = now
        self.current = max(self.current, outstanding)

    @property
    def value(self) -> int:
        return max(self.current, self.previous)


def rows_of(inputs: Mapping[str, np.ndarray]) -> int:
    """The batch size of a request: the shared leading dimension of its inputs."""
    sizes = {array.shape[0] if array.ndim else -1 for array in inputs.values()}
    if len(sizes) != 1 or -1 in sizes:
        raise InvalidArgument(
            f"inputs must share their first (batch) dimension to be batched; got first dimensions {sorted(sizes)}"
        )
    return sizes.pop()


class DynamicBatcher:
    """Queues requests of one model version and runs them in batches on an executor."""

    def __init__(
        self,
        run: Runner,
        executor: Executor,
        policy: BatchPolicy,
        observer: Callable[[Execution], None] | None = None,
    ) -> None:
        self._run = run
        self._executor = executor
        self.policy = policy
        self._observer = observer
        self._queue: deque[Request] = deque()
        self._queued_rows = 0
        self._arrived = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._free_slots = policy.instances
        self._outstanding = 0
        self._executing = 0
        self._peak = _Peak()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._compute_ns: dict[int, float] = {}

    @property
    def queue_depth(self) -> int:
        """Requests waiting now."""
        return len(self._queue)

    async def submit(self, inputs: Mapping[str, np.ndarray], deadline: float | None = None) -> Request:
        """Run `inputs` in some batch; the returned request holds its rows of every output in
        `result`, and when it was queued, dispatched and finished.

        `deadline` is on the event loop's clock; a request still queued past it is dropped
        before inference with DEADLINE_EXCEEDED.
        """
        if self._closed:
            raise Unavailable("the model version is unloading")
        rows = rows_of(inputs)  # a request larger than max_batch_size runs alone, in one execution
        if len(self._queue) >= self.policy.max_queue_size:
            raise ResourceExhausted(
                f"the model's queue is full ({self.policy.max_queue_size} requests waiting); retry later"
            )
        loop = asyncio.get_running_loop()
        request = Request(
            inputs=inputs,
            rows=rows,
            trailing=tuple(sorted((name, array.dtype.str, array.shape[1:]) for name, array in inputs.items())),
            future=loop.create_future(),
            arrived_ns=time.perf_counter_ns(),
            deadline=deadline,
        )
        if self.policy.max_queue_delay_s == 0 and not self._queue and self._free_slots and self._runs_inline(rows):
            return self._run_now(request, loop.time())
        self._outstanding += 1
        self._peak.observe(self._outstanding, loop.time())
        # Queued even when idle: the scheduler runs one loop iteration later and so also takes
        # whatever arrived in the same iteration (a burst of calls read off one connection).
        self._queue.append(request)
        self._queued_rows += rows
        self._arrived.set()
        if self._task is None:
            self._task = loop.create_task(self._schedule(), name="batcher")
        try:
            request.result = await request.future
            return request
        finally:
            self._outstanding -= 1

    async def close(self) -> None:
        """Stop scheduling; anything still queued fails as UNAVAILABLE."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        while self._queue:
            request = self._queue.popleft()
            if not request.future.done():
                request.future.set_exception(Unavailable("the model version was unloaded before this request ran"))

    async def _schedule(self) -> None:
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            while self._free_slots == 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
            if self.policy.max_queue_delay_s > 0:
                await self._gather_companions()
            batch = self._take()
            if batch:
                self._dispatch(batch)

    async def _gather_companions(self) -> None:
        """Wait, within the delay of the oldest request, for the companions recent load promises."""
        oldest = self._queue[0].arrived_ns
        deadline_ns = oldest + int(self.policy.max_queue_delay_s * 1e9)
        while True:
            expected = min(self.policy.max_batch_size, self._peak.value - self._executing)
            if self._queued_rows >= expected or self._preferred_reached():
                return
            remaining = (deadline_ns - time.perf_counter_ns()) / 1e9
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return
            if not self._queue:  # everything waiting was cancelled
                return

    def _preferred_reached(self) -> bool:
        sizes = self.policy.preferred_batch_sizes
        return bool(sizes) and (self._queued_rows in sizes or self._queued_rows >= max(sizes))

    def _take(self) -> list[Request]:
        """Pop the next batch: FIFO, same trailing shapes, within the size limit; drop the dead."""
        limit = self.policy.max_batch_size
        if self.policy.preferred_batch_sizes:
            fitting = [size for size in self.policy.preferred_batch_sizes if size <= self._queued_rows]
            if fitting:
                limit = max(fitting)
        now = asyncio.get_running_loop().time()
        batch: list[Request] = []
        rows = 0
        while self._queue:
            request = self._queue[0]
            if request.future.done():  # the caller went away
                self._pop()
                continue
            if request.deadline is not None and now >= request.deadline:
                self._pop()
                waited_ms = (time.perf_counter_ns() - request.arrived_ns) / 1e6
                request.future.set_exception(
                    DeadlineExceeded(f"the request's deadline passed after {waited_ms:.1f} ms in the queue")
                )
                continue
            if batch and (rows + request.rows > limit or request.trailing != batch[0].trailing):
                break
            self._pop()
            batch.append(request)
            rows += request.rows
        return batch

    def _pop(self) -> Request:
        request = self._queue.popleft()
        self._queued_rows -= request.rows
        return request

    def _run_now(self, request: Request, now: float) -> Request:
        """Greedy batching with nothing queued, a free slot and a batch cheaper than a thread
        hand-off: run in the caller's coroutine, skipping queue, scheduler and future."""
        if request.deadline is not None and now >= request.deadline:
            raise DeadlineExceeded("the request's deadline passed before it could run")
        request.dispatched_ns = time.perf_counter_ns()
        request.result, compute_ns = self._timed_run(request.inputs)
        request.finished_ns = time.perf_counter_ns()
        self._learn(request.rows, compute_ns)
        if self._observer is not None:
            self._observer(Execution(request.rows, [request], compute_ns, False, compute_ns))
        return request

    def _timed_run(self, inputs: Mapping[str, np.ndarray]) -> tuple[Arrays, int]:
        # Timed where it runs: the hand-off to a thread must not count as compute.
        start = time.perf_counter_ns()
        outputs = self._run(inputs)
        return outputs, time.perf_counter_ns() - start

    def _runs_inline(self, rows: int) -> bool:
        recent = self._compute_ns.get(rows)
        return recent is not None and recent < self.policy.inline_below_ns

    def _learn(self, rows: int, ns: int) -> None:
        """Keep a moving average of the compute time of each batch size seen."""
        if self.policy.inline_below_ns <= 0:
            return
        recent = self._compute_ns.get(rows)
        if recent is None and len(self._compute_ns) >= MAX_TRACKED_SIZES:
            return
        self._compute_ns[rows] = ns if recent is None else 0.8 * recent + 0.2 * ns

    def _dispatch(self, batch: list[Request]) -> None:
        """Start one execution of `batch` on a free slot: on the event loop when it is cheaper than a
        thread hand-off, else on the executor; `_complete` answers its requests."""
        start = time.perf_counter_ns()
        for request in batch:
            request.dispatched_ns = start
        self._free_slots -= 1
        self._executing += len(batch)
        total = sum(request.rows for request in batch)
        input_ns = 0
        outcome: tuple[Arrays, int] | BaseException
        try:
            if len(batch) == 1:
                inputs: Mapping[str, np.ndarray] = batch[0].inputs
            else:
                inputs = {name: np.concatenate([r.inputs[name] for r in batch]) for name in batch[0].inputs}
            input_ns = time.perf_counter_ns() - start
            if self._runs_inline(total):
                outcome = self._timed_run(inputs)
            else:
                running = self._executor.submit(self._timed_run, inputs)
                loop = asyncio.get_running_loop()
                running.add_done_callback(lambda done: self._hand_back(loop, batch, total, start, input_ns, done))
                return
        except Exception as err:  # noqa: BLE001 - every waiter gets the batch's failure
            outcome = err
        self._complete(batch, total, start, input_ns, outcome, chain=False)

    def _hand_back(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[Request],
        total: int,
        start: int,
        input_ns: int,
        done: Future[tuple[Arrays, int]],
    ) -> None:
        """On the executor's thread: give a finished run back to the event loop, unless the loop has
        closed while the model ran (the process is shutting down and no caller is left to answer)."""
        try:
            loop.call_soon_threadsafe(self._finished_running, batch, total, start, input_ns, done)
        except RuntimeError:
            if not loop.is_closed():
                raise

    def _finished_running(
        self, batch: list[Request], total: int, start: int, input_ns: int, done: Future[tuple[Arrays, int]]
    ) -> None:
        try:
            outcome: tuple[Arrays, int] | BaseException = done.result()
        except BaseException as err:  # noqa: BLE001 - a cancelled or failed run fails its waiters
            outcome = err
        self._complete(batch, total, start, input_ns, outcome, chain=True)

    def _complete(
        self,
        batch: list[Request],
        total: int,
        start: int,
        input_ns: int,
        outcome: tuple[Arrays, int] | BaseException,
        chain: bool,
    ) -> None:
        """Free the slot and, with `chain` (a run on the executor ended), start the next batch first,
        so the model runs while this batch's callers take their answers; then answer each caller
        with its own rows. Inline runs leave the next batch to the scheduler: chaining them would
        recurse once per batch through a long queue."""
        finished = time.perf_counter_ns()
        self._executing -= len(batch)
        self._free_slots += 1
        if chain and self.policy.max_queue_delay_s == 0 and self._queue and not self._closed:
            next_batch = self._take()
            if next_batch:
                self._dispatch(next_batch)
        self._slot_freed.set()
        failed = isinstance(outcome, BaseException)
        infer_ns = 0
        if isinstance(outcome, BaseException):
            error = outcome if isinstance(outcome, Exception) else Unavailable("the model run was cancelled")
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(error)
        else:
            outputs, infer_ns = outcome
            self._learn(total, infer_ns)
            offset = 0
            for request in batch:
                if not request.future.done():
                    request.future.set_result(
                        {
                            name: array[offset : offset + request.rows]
                            if array.ndim and array.shape[0] == total
                            else array
                            for name, array in outputs.items()
                        }
                    )
                offset += request.rows
        for request in batch:
            request.finished_ns = finished
        if self._observer is not None:
            self._observer(Execution(total, batch, finished - start, failed, infer_ns, input_ns))
