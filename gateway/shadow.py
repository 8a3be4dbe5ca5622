"""Shadow traffic: a sampled share of answered requests is mirrored to the route's shadow version
through a bounded queue that the request only ever offers to (never waits on), each mirrored call
with its own deadline. A full queue drops the mirror and counts it; answers are compared with the
answers served and recorded in the metric windows. The response and its latency never depend on it."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import numpy as np
from prometheus_client import CollectorRegistry, Counter

from chassis.errors import FrescoError
from chassis.status import status_for
from fresco.api.common.v1 import values_pb2
from gateway.assembly import FeatureValue
from gateway.metric_windows import MetricWindows, WindowKey
from gateway.route_choice import Target
from model_manager.routes import MetricsConfig

log = logging.getLogger(__name__)
TOLERANCE: Final = 1e-6  # answers closer than this agree (float noise across processes)

Answers = list[dict[str, values_pb2.Tensor]]


@dataclass(frozen=True)
class ShadowJob:
    """Rows answered by the live version, to send to the shadow version and compare."""

    target: Target
    metrics: MetricsConfig
    rows: list[dict[str, FeatureValue]]
    labels: list[str]
    outputs: tuple[str, ...]
    served: Answers


def tensor_values(tensor: values_pb2.Tensor) -> np.ndarray:
    """A tensor's numeric elements as float64, flat; empty for BYTES."""
    for values in (tensor.double_values, tensor.int64_values, tensor.uint64_values, tensor.bool_values):
        if len(values):
            return np.asarray(values, dtype=np.float64)
    return np.zeros(0)


def score_output(answer: dict[str, values_pb2.Tensor], output: str) -> str:
    """The output a route's scores come from: the one it names, else the answer's first."""
    return output or next(iter(answer), "")


def score_of(answer: dict[str, values_pb2.Tensor], output: str) -> float | None:
    """A row's score: the last element of the score output (the positive class of a binary classifier)."""
    tensor = answer.get(score_output(answer, output))
    if tensor is None:
        return None
    # The last of tensor_values(tensor), read without building the array: this runs for every answer.
    for values in (tensor.double_values, tensor.int64_values, tensor.uint64_values, tensor.bool_values):
        if len(values):
            return float(values[-1])
    return None


def compare(
    served: dict[str, values_pb2.Tensor], mirrored: dict[str, values_pb2.Tensor], output: str
) -> tuple[bool, float]:
    """(disagreed, |score difference|): disagreement is any common numeric output differing beyond the tolerance."""
    disagreed = False
    for name in served.keys() & mirrored.keys():
        a, b = tensor_values(served[name]), tensor_values(mirrored[name])
        disagreed |= a.shape != b.shape or not np.allclose(a, b, rtol=0.0, atol=TOLERANCE)
    score_a, score_b = score_of(served, output), score_of(mirrored, output)
    diff = abs(score_a - score_b) if score_a is not None and score_b is not None else 0.0
    return disagreed, diff


class ShadowMirror:
    """The bounded mirror queue and the workers that drain it."""

    def __init__(
        self,
        call: Callable[[ShadowJob, float], Awaitable[Answers]],
        windows: MetricWindows | None,
        registry: CollectorRegistry,
        queue_size: int = 100,
        workers: int = 2,
        timeout_s: float = 2.0,
        rng: random.Random | None = None,
    ) -> None:
        self._call = call
        self._windows = windows
        self._queue: asyncio.Queue[ShadowJob] = asyncio.Queue(maxsize=queue_size)
        self._workers = workers
        self._timeout_s = timeout_s
        self._rng = rng or random.Random()
        self._tasks: list[asyncio.Task[None]] = []
        self.dropped = Counter(
            "fresco_gateway_shadow_dropped",
            "Mirrored requests dropped: shadow queue full.",
            ["model"],
            registry=registry,
        )
        self.mirrored = Counter(
            "fresco_gateway_shadow_mirrored", "Mirrored requests answered and compared.", ["model"], registry=registry
        )

    def sampled(self, share: float) -> bool:
        """Whether to mirror one request of a route mirroring `share` of its traffic."""
        return share >= 1.0 or self._rng.random() < share

    def offer(self, job: ShadowJob) -> bool:
        """Queue a mirror without waiting; False (counted) when the queue is full."""
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._work(), name=f"shadow-{i}") for i in range(self._workers)]
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.dropped.labels(job.target.model).inc()
            if self._windows is not None:
                self._windows.drop(self._key(job), job.metrics)
            return False
        return True

    @staticmethod
    def _key(job: ShadowJob) -> WindowKey:
        return WindowKey(job.target.model, job.target.version, job.target.revision, shadow=True)

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                await self._mirror(job)
            except Exception:  # a mirror never takes the worker down
                log.exception("shadow call to %s version %s failed", job.target.model, job.target.version)

    async def _mirror(self, job: ShadowJob) -> None:
        started = time.perf_counter()
        route = job.target.route
        output = route.score_output if route is not None else ""
        bounds = route.score_bounds if route is not None else ()
        key = self._key(job)
        try:
            answers = await asyncio.wait_for(self._call(job, self._timeout_s), self._timeout_s)
        except (FrescoError, TimeoutError) as err:
            status = status_for(err).name if isinstance(err, FrescoError) else "DEADLINE_EXCEEDED"
            if self._windows is not None:
                latency = (time.perf_counter() - started) * 1000
                self._windows.record(key, job.metrics, status, latency, count=len(job.rows))
            return
        latency = (time.perf_counter() - started) * 1000
        self.mirrored.labels(job.target.model).inc(len(answers))
        if self._windows is None:
            return
        # Only the mirrored answers' scores are sketched: the inputs are the live version's, sketched there.
        self._windows.record(
            key,
            job.metrics,
            "OK",
            latency,
            count=len(answers),
            scores=[score_of(mirrored, output) for mirrored in answers],
            score_output=score_output(answers[0], output) if answers else output,
            score_bounds=bounds,
        )
        for served, mirrored in zip(job.served, answers, strict=True):
            disagreed, diff = compare(served, mirrored, output)
            self._windows.compare(key, job.metrics, disagreed, diff)

    def queued(self) -> int:
        """Mirrors waiting in the queue."""
        return self._queue.qsize()

    async def close(self) -> None:
        """Stop the workers; queued mirrors are dropped."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
