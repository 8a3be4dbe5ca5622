"""The dynamic batcher with a real numpy runner on a thread pool: every request gets exactly its rows,
batches respect their size limit, and the waiting promises hold (no wait when idle, never past the
delay counted from the oldest request, preferred sizes at once); queue cap, deadlines, failures,
cancellation, close and several instances.

Timing is asserted structurally (which requests shared a batch, which waited for which) and only
with generous bounds where the promise itself is a time."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from chassis.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from predictor.batcher import BatchPolicy, DynamicBatcher, Execution, Request, rows_of

WIDTH = 4
POISON = -999.0  # a batch holding this value fails in the runner


class Runner:
    """The model: doubles `x` and sums its rows; records every batch it is given. It can be held
    (each batch waits until `release()`) or made to meet another batch at a barrier."""

    def __init__(self, held: bool = False, barrier: threading.Barrier | None = None) -> None:
        self.batches: list[np.ndarray] = []
        self._lock = threading.Lock()
        self._gate = threading.Event()
        if not held:
            self._gate.set()
        self._barrier = barrier

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        with self._lock:
            self.batches.append(x.copy())
        if self._barrier is not None:
            self._barrier.wait()
        assert self._gate.wait(10), "the test never released the runner"
        if (x == POISON).any():
            raise ValueError(f"poisoned batch of {len(x)} rows")
        return {"y": x * 2, "s": x.sum(axis=1, keepdims=True)}

    def release(self) -> None:
        self._gate.set()

    @property
    def sizes(self) -> list[int]:
        with self._lock:
            return [len(batch) for batch in self.batches]

    def saw(self, marker: float) -> bool:
        """Whether any batch held the value `marker`."""
        with self._lock:
            return any((batch == marker).any() for batch in self.batches)


class Executions:
    """The observer: what each executed batch held."""

    def __init__(self) -> None:
        self.seen: list[Execution] = []

    def __call__(self, execution: Execution) -> None:
        self.seen.append(execution)

    @property
    def compositions(self) -> list[list[int]]:
        """The row counts of the requests of each batch, in execution order."""
        return [[request.rows for request in execution.requests] for execution in self.seen]

    def clear(self) -> None:
        self.seen.clear()


Build = Callable[..., DynamicBatcher]
Run = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


@pytest.fixture
async def build(executor: ThreadPoolExecutor) -> AsyncIterator[Build]:
    """Makes batchers over the test's thread pool (max_batch_size 16 unless told) and closes them
    afterwards."""
    made: list[DynamicBatcher] = []

    def make(run: Run, observer: Executions | None = None, **policy: Any) -> DynamicBatcher:
        batcher = DynamicBatcher(run, executor, BatchPolicy(**{"max_batch_size": 16, **policy}), observer)
        made.append(batcher)
        return batcher

    yield make
    for batcher in made:
        await batcher.close()


def rows(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.normal(size=(count, WIDTH)).astype(np.float32)


def marked(value: float, count: int = 1) -> np.ndarray:
    """Rows filled with one recognisable value."""
    return np.full((count, WIDTH), value, dtype=np.float32)


def assert_answers(request: Request, x: np.ndarray) -> None:
    """The request got exactly its own rows of each output."""
    assert request.rows == len(x)
    assert set(request.result) == {"y", "s"}
    np.testing.assert_array_equal(request.result["y"], x * 2)
    np.testing.assert_allclose(request.result["s"], x.sum(axis=1, keepdims=True), rtol=1e-6)
    assert request.arrived_ns <= request.dispatched_ns <= request.finished_ns


async def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


def ms(ns: int) -> float:
    return ns / 1e6


async def test_every_request_gets_exactly_its_rows_under_concurrency(build: Build) -> None:
    """200 requests of 1–5 random rows: half at once, half spread over a few milliseconds while
    batches run; each gets back exactly its rows of both outputs."""
    rng = np.random.default_rng(20)
    runner, executions = Runner(), Executions()
    batcher = build(runner, executions, max_batch_size=16)
    inputs = [rows(rng, int(rng.integers(1, 6))) for _ in range(200)]
    pauses = [0.0] * 100 + [float(p) for p in rng.uniform(0, 0.02, size=100)]

    async def client(x: np.ndarray, pause: float) -> Request:
        if pause:
            await asyncio.sleep(pause)
        return await batcher.submit({"x": x})

    requests = await asyncio.gather(*(client(x, pause) for x, pause in zip(inputs, pauses, strict=True)))
    for request, x in zip(requests, inputs, strict=True):
        assert_answers(request, x)
    assert sum(runner.sizes) == sum(len(x) for x in inputs)
    assert max(runner.sizes) <= 16
    assert max(runner.sizes) > 5, "requests of at most 5 rows were never batched together"
    assert len(executions.seen) == len(runner.batches) < len(inputs)
    assert not any(execution.failed for execution in executions.seen)
    assert sum(len(execution.requests) for execution in executions.seen) == len(inputs)


async def test_batches_stay_within_max_batch_size_but_an_oversized_request_runs_alone(build: Build) -> None:
    rng = np.random.default_rng(21)
    runner, executions = Runner(), Executions()
    batcher = build(runner, executions, max_batch_size=8)
    counts = [3, 20, 2, 5, 9, 1, 4, 8, 2, 2, 30, 1]
    inputs = [rows(rng, count) for count in counts]
    requests = await asyncio.gather(*(batcher.submit({"x": x}) for x in inputs))
    for request, x in zip(requests, inputs, strict=True):
        assert_answers(request, x)
    for composition in executions.compositions:
        assert sum(composition) <= 8 or len(composition) == 1, composition
    for big in (9, 20, 30):
        assert [big] in executions.compositions
    assert sorted(n for composition in executions.compositions for n in composition) == sorted(counts)


@pytest.mark.parametrize("delay_s", [0.0, 5.0], ids=["greedy", "delay-5s"])
async def test_a_lone_request_never_waits_and_load_forms_batches(build: Build, delay_s: float) -> None:
    """At concurrency 1 the batcher expects no companions, so even with a 5 s delay configured a
    request leaves the queue at once; a burst then forms batches. The delay is long so that a
    request that waited for it can never be mistaken for one that met a slow scheduler."""
    rng = np.random.default_rng(22)
    runner = Runner()
    batcher = build(runner, max_batch_size=32, max_queue_delay_s=delay_s)
    for _ in range(10):
        x = rows(rng, 1)
        request = await batcher.submit({"x": x})
        assert_answers(request, x)
        assert ms(request.dispatched_ns - request.arrived_ns) < 2500
    assert runner.sizes == [1] * 10
    burst = [rows(rng, 1) for _ in range(24)]
    requests = await asyncio.gather(*(batcher.submit({"x": x}) for x in burst))
    for request, x in zip(requests, burst, strict=True):
        assert_answers(request, x)
    assert max(runner.sizes[10:]) > 1


async def test_with_a_long_delay_a_burst_after_a_burst_goes_out_as_one_batch(build: Build) -> None:
    """A burst of 8 teaches the batcher to expect 8; the next 8, arriving 20 ms apart, wait for each
    other (within the 2 s delay) and run as one batch. Delays are long next to scheduling noise."""
    rng = np.random.default_rng(23)
    runner, executions = Runner(), Executions()
    batcher = build(runner, executions, max_batch_size=64, max_queue_delay_s=2.0)
    await asyncio.gather(*(batcher.submit({"x": rows(rng, 1)}) for _ in range(8)))
    assert executions.compositions == [[1] * 8]
    executions.clear()

    inputs = [rows(rng, 1) for _ in range(8)]

    async def client(index: int) -> Request:
        await asyncio.sleep(index * 0.02)
        return await batcher.submit({"x": inputs[index]})

    requests = await asyncio.gather(*(client(i) for i in range(8)))
    for request, x in zip(requests, inputs, strict=True):
        assert_answers(request, x)
    assert executions.compositions == [[1] * 8]
    oldest = min(request.arrived_ns for request in requests)
    (dispatched,) = {request.dispatched_ns for request in requests}
    assert dispatched >= max(request.arrived_ns for request in requests)
    assert ms(dispatched - oldest) < 2000 + 1000


async def test_never_waits_past_the_delay_counted_from_the_oldest_request(build: Build) -> None:
    """The batcher expects 8 companions (a recent burst) but only 2 requests come, 300 ms apart:
    it gives up 800 ms after the FIRST one arrived, not 800 ms after the second. The bounds leave
    250 ms for scheduling noise (a burst is remembered for 0.5-1 s, which caps the delay)."""
    rng = np.random.default_rng(24)
    runner, executions = Runner(), Executions()
    batcher = build(runner, executions, max_batch_size=64, max_queue_delay_s=0.8)
    await asyncio.gather(*(batcher.submit({"x": rows(rng, 1)}) for _ in range(8)))
    executions.clear()

    first_x, second_x = rows(rng, 2), rows(rng, 1)
    first = asyncio.ensure_future(batcher.submit({"x": first_x}))
    await asyncio.sleep(0.3)
    second = await batcher.submit({"x": second_x})
    first_request = await first
    assert_answers(first_request, first_x)
    assert_answers(second, second_x)
    assert executions.compositions == [[2, 1]]
    assert first_request.dispatched_ns == second.dispatched_ns
    waited = ms(first_request.dispatched_ns - first_request.arrived_ns)
    assert waited >= 750, f"dispatched after {waited:.1f} ms although 8 companions were expected"
    assert waited < 800 + 250, f"the oldest request waited {waited:.1f} ms, past the 800 ms delay"
    assert ms(second.dispatched_ns - second.arrived_ns) < 700, "the delay restarted at the second arrival"


async def test_a_preferred_batch_size_dispatches_at_once(build: Build) -> None:
    """With a 5 s delay and 16 companions expected, reaching the preferred size 4 dispatches."""
    rng = np.random.default_rng(25)
    runner, executions = Runner(), Executions()
    batcher = build(runner, executions, max_batch_size=16, max_queue_delay_s=5.0, preferred_batch_sizes=(4,))
    await asyncio.gather(*(batcher.submit({"x": rows(rng, 1)}) for _ in range(16)))
    executions.clear()

    inputs = [rows(rng, 1) for _ in range(4)]

    async def client(index: int) -> Request:
        await asyncio.sleep(index * 0.005)
        return await batcher.submit({"x": inputs[index]})

    requests = await asyncio.gather(*(client(i) for i in range(4)))
    for request, x in zip(requests, inputs, strict=True):
        assert_answers(request, x)
    assert executions.compositions == [[1, 1, 1, 1]]
    oldest = min(request.arrived_ns for request in requests)
    assert ms(requests[0].dispatched_ns - oldest) < 2500, "waited for the delay despite the preferred size"


async def test_preferred_batch_size_caps_what_is_taken(build: Build) -> None:
    """Six queued rows with preferred size 4 (greedy): a batch of 4, then the remaining 2."""
    rng = np.random.default_rng(26)
    runner, executions = Runner(), Executions()
    batcher = build(runner, executions, max_batch_size=8, preferred_batch_sizes=(4,))
    inputs = [rows(rng, 1) for _ in range(6)]
    requests = await asyncio.gather(*(batcher.submit({"x": x}) for x in inputs))
    for request, x in zip(requests, inputs, strict=True):
        assert_answers(request, x)
    assert runner.sizes == [4, 2]


async def test_a_full_queue_is_resource_exhausted(build: Build) -> None:
    runner = Runner(held=True)
    batcher = build(runner, max_queue_size=2)
    running = asyncio.ensure_future(batcher.submit({"x": marked(1)}))
    await eventually(lambda: len(runner.sizes) == 1)  # executing, so no longer queued
    queued = [asyncio.ensure_future(batcher.submit({"x": marked(v)})) for v in (2, 3)]
    await eventually(lambda: batcher.queue_depth == 2)
    with pytest.raises(ResourceExhausted, match=r"queue is full \(2 requests waiting\)"):
        await batcher.submit({"x": marked(4)})
    runner.release()
    for request, value in zip(await asyncio.gather(running, *queued), (1, 2, 3), strict=True):
        assert_answers(request, marked(value))
    assert not runner.saw(4)


async def test_an_expired_deadline_fails_before_inference(build: Build) -> None:
    runner = Runner(held=True)
    batcher = build(runner)
    loop = asyncio.get_running_loop()
    running = asyncio.ensure_future(batcher.submit({"x": marked(1)}))
    await eventually(lambda: len(runner.sizes) == 1)
    late = asyncio.ensure_future(batcher.submit({"x": marked(2)}, deadline=loop.time() + 0.05))
    await asyncio.sleep(0.1)
    runner.release()
    with pytest.raises(DeadlineExceeded, match=r"deadline passed after \d+\.\d ms in the queue"):
        await late
    assert_answers(await running, marked(1))
    with pytest.raises(DeadlineExceeded):  # already past on arrival, with the batcher idle
        await batcher.submit({"x": marked(3)}, deadline=loop.time() - 1)
    assert not runner.saw(2)
    assert not runner.saw(3)
    assert_answers(await batcher.submit({"x": marked(4)}, deadline=loop.time() + 5), marked(4))


async def test_a_failing_batch_fails_each_waiter_and_the_batcher_goes_on(build: Build) -> None:
    rng = np.random.default_rng(27)
    runner, executions = Runner(), Executions()
    batcher = build(runner, executions)
    inputs = [rows(rng, 2), marked(POISON), rows(rng, 1), rows(rng, 3)]
    outcomes = await asyncio.gather(*(batcher.submit({"x": x}) for x in inputs), return_exceptions=True)
    assert executions.compositions == [[2, 1, 1, 3]]
    assert executions.seen[0].failed
    for outcome in outcomes:
        assert isinstance(outcome, ValueError), outcome
        assert str(outcome) == "poisoned batch of 7 rows"
    x = rows(rng, 2)
    assert_answers(await batcher.submit({"x": x}), x)
    assert not executions.seen[1].failed


async def test_a_cancelled_request_is_skipped(build: Build) -> None:
    runner, executions = Runner(held=True), Executions()
    batcher = build(runner, executions)
    running = asyncio.ensure_future(batcher.submit({"x": marked(1)}))
    await eventually(lambda: len(runner.sizes) == 1)
    gone = asyncio.ensure_future(batcher.submit({"x": marked(2)}))
    kept = asyncio.ensure_future(batcher.submit({"x": marked(3)}))
    await eventually(lambda: batcher.queue_depth == 2)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    runner.release()
    assert_answers(await running, marked(1))
    assert_answers(await kept, marked(3))
    assert not runner.saw(2)
    assert executions.compositions == [[1], [1]]


async def test_close_fails_queued_requests_as_unavailable(build: Build) -> None:
    runner = Runner(held=True)
    batcher = build(runner)
    running = asyncio.ensure_future(batcher.submit({"x": marked(1)}))
    await eventually(lambda: len(runner.sizes) == 1)
    queued = [asyncio.ensure_future(batcher.submit({"x": marked(v)})) for v in (2, 3)]
    await eventually(lambda: batcher.queue_depth == 2)
    await batcher.close()
    for request in queued:
        with pytest.raises(Unavailable, match="unloaded before this request ran"):
            await request
    runner.release()
    assert_answers(await running, marked(1))  # what was already executing completes
    with pytest.raises(Unavailable, match="unloading"):
        await batcher.submit({"x": marked(4)})
    assert not runner.saw(2)
    assert not runner.saw(3)


async def test_two_instances_run_two_batches_at_once(build: Build) -> None:
    """The runner waits at a barrier for a second batch: only two execution slots get past it."""
    runner, executions = Runner(barrier=threading.Barrier(2, timeout=5)), Executions()
    batcher = build(runner, executions, instances=2)
    first = asyncio.ensure_future(batcher.submit({"x": marked(1)}))
    await eventually(lambda: len(runner.sizes) == 1)  # the first batch waits at the barrier
    second = await batcher.submit({"x": marked(2, 3)})
    first_request = await first
    assert_answers(first_request, marked(1))
    assert_answers(second, marked(2, 3))
    assert executions.compositions == [[1], [3]] or executions.compositions == [[3], [1]]
    assert second.dispatched_ns < first_request.finished_ns


@pytest.mark.parametrize(
    "second",
    [{"z": np.ones((2, 3), np.float32)}, {"x": np.ones((2, 3), np.float64)}],
    ids=["other-input-names", "other-dtype"],
)
async def test_requests_that_cannot_be_concatenated_never_share_a_batch(
    build: Build, second: dict[str, np.ndarray]
) -> None:
    """Requests of the same trailing shapes but other input names or dtypes cannot be one batch:
    each must be answered as if alone, and the batcher must keep serving. Grouping only by trailing
    shapes puts them together: other names raise KeyError while the batch is assembled, outside the
    error handling, so its execution slot is lost and every waiter hangs; another dtype is silently
    upcast, so a float32 request gets float64 answers."""

    def echo(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: array * 2 for name, array in inputs.items()}

    batcher = build(echo)
    first = {"x": np.ones((2, 3), np.float32)}
    answers = await asyncio.wait_for(asyncio.gather(batcher.submit(first), batcher.submit(second)), 1)
    for request, inputs in zip(answers, (first, second), strict=True):
        assert set(request.result) == set(inputs)
        for name, array in inputs.items():
            assert request.result[name].dtype == array.dtype
            np.testing.assert_array_equal(request.result[name], array * 2)
    again = await asyncio.wait_for(batcher.submit(first), 1)
    np.testing.assert_array_equal(again.result["x"], first["x"] * 2)


def test_rows_of_needs_a_shared_leading_dimension() -> None:
    assert rows_of({"a": np.zeros((3, 2)), "b": np.zeros((3,))}) == 3
    with pytest.raises(InvalidArgument, match=r"first dimensions \[2, 3\]"):
        rows_of({"a": np.zeros((3, 2)), "b": np.zeros((2,))})
    with pytest.raises(InvalidArgument, match="share their first"):
        rows_of({"a": np.array(1.0, np.float32)})


async def test_a_request_with_mismatched_rows_is_invalid_before_queueing(build: Build) -> None:
    runner = Runner()
    batcher = build(runner)
    with pytest.raises(InvalidArgument):
        await batcher.submit({"x": marked(1, 2), "w": np.zeros((3,))})
    assert batcher.queue_depth == 0
    assert runner.sizes == []


async def test_the_next_batch_starts_before_the_finished_batch_is_answered(build: Build) -> None:
    """When a run ends, what queued meanwhile is dispatched before the finished batch's callers
    resume, so the model works while they take their answers: by the time the first caller holds
    its answer, nothing is left in the queue."""
    runner, executions = Runner(held=True), Executions()
    batcher = build(runner, executions)

    async def first_caller() -> tuple[Request, int]:
        request = await batcher.submit({"x": marked(1)})
        return request, batcher.queue_depth

    first = asyncio.ensure_future(first_caller())
    await eventually(lambda: len(runner.sizes) == 1)
    queued = [asyncio.ensure_future(batcher.submit({"x": marked(v)})) for v in (2, 3)]
    await eventually(lambda: batcher.queue_depth == 2)
    runner.release()
    request, depth_when_answered = await first
    assert depth_when_answered == 0
    assert_answers(request, marked(1))
    for future, value in zip(queued, (2, 3), strict=True):
        assert_answers(await future, marked(value))
    assert executions.compositions == [[1], [1, 1]]


async def test_a_caller_leaving_mid_batch_does_not_disturb_the_others(build: Build) -> None:
    """Three requests run as one batch; the middle caller is cancelled while the model runs. The
    other two still get exactly their rows, and the batcher goes on."""
    rng = np.random.default_rng(28)
    runner, executions = Runner(held=True), Executions()
    batcher = build(runner, executions)
    inputs = [rows(rng, 2), rows(rng, 1), rows(rng, 3)]
    futures = [asyncio.ensure_future(batcher.submit({"x": x})) for x in inputs]
    await eventually(lambda: len(runner.sizes) == 1)
    assert runner.sizes == [6]
    futures[1].cancel()
    runner.release()
    with pytest.raises(asyncio.CancelledError):
        await futures[1]
    assert_answers(await futures[0], inputs[0])
    assert_answers(await futures[2], inputs[2])
    assert executions.compositions == [[2, 1, 3]]
    x = rows(rng, 2)
    assert_answers(await batcher.submit({"x": x}), x)


async def test_a_chained_batch_that_fails_fails_only_its_own_callers(build: Build) -> None:
    """The batch started as the first one ends is poisoned, and one of its callers has a deadline that passed while
    it queued: the first batch's callers get their rows, the chained batch's live callers its error, the late one
    DEADLINE_EXCEEDED, and the batcher goes on."""
    rng = np.random.default_rng(31)
    runner = Runner(held=True)
    batcher = build(runner)
    first_x = rows(rng, 2)
    first = asyncio.ensure_future(batcher.submit({"x": first_x}))
    await eventually(lambda: len(runner.sizes) == 1)
    poisoned = asyncio.ensure_future(batcher.submit({"x": np.full((1, first_x.shape[1]), POISON, first_x.dtype)}))
    late = asyncio.ensure_future(batcher.submit({"x": rows(rng, 1)}, deadline=asyncio.get_running_loop().time()))
    fellow_x = rows(rng, 3)
    fellow = asyncio.ensure_future(batcher.submit({"x": fellow_x}))
    await eventually(lambda: batcher.queue_depth == 3)
    runner.release()
    assert_answers(await first, first_x)
    with pytest.raises(DeadlineExceeded):
        await late
    for caller in (poisoned, fellow):
        with pytest.raises(ValueError, match="poisoned batch of 4 rows"):
            await caller
    assert runner.sizes == [2, 4]
    x = rows(rng, 1)
    assert_answers(await batcher.submit({"x": x}), x)


def test_a_run_ending_after_its_event_loop_closed_is_dropped_quietly(caplog: pytest.LogCaptureFixture) -> None:
    """Shutdown may close the event loop while a batch still runs on the executor: the run's end must
    not fail in the executor's thread (concurrent.futures logged "exception calling callback":
    "Event loop is closed")."""
    runner = Runner(held=True)
    with ThreadPoolExecutor(1) as executor:

        async def start_and_leave() -> None:
            batcher = DynamicBatcher(runner, executor, BatchPolicy(max_batch_size=4))
            waiting = asyncio.ensure_future(batcher.submit({"x": np.ones((1, WIDTH), np.float32)}))
            await eventually(lambda: len(runner.sizes) == 1)  # the run is on the executor, held
            waiting.cancel()
            await batcher.close()  # as an unload or shutdown does; the run goes on in its thread
            await asyncio.sleep(0)  # the scheduler task takes its cancellation

        loop = asyncio.new_event_loop()
        loop.run_until_complete(start_and_leave())
        loop.close()
        runner.release()
    # The executor has shut down: the held run and its done-callback have finished.
    assert runner.sizes == [1]
    assert not [r for r in caplog.records if "callback" in r.getMessage()], caplog.text
