"""What the gateway observed, in windows of about 10 s per (model, version, route revision, mirrored):
latency histograms over the bounds the manager publishes, counts by status code name, score
histograms over the route's score bounds, shadow comparisons, value sketches of the inputs and
scores, and prediction records for late labels (`gateway.window_sketches`). Each closed window gets
an id unique to this gateway process, so a retried report is counted once; `WindowReporter` sends
them."""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from grpc import aio
from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter

from fresco.api.features.v1 import statistics_pb2
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as pb_grpc
from fresco.api.models.v1 import routing_pb2
from gateway.window_sketches import Called, WindowSketches
from model_manager.routes import MetricsConfig

log = logging.getLogger(__name__)
_REPORT_TIMEOUT_S: Final = 5.0
_NAP_S: Final = 0.5  # the longest the reporter sleeps before it looks at the window length again
DEFAULT_RECORD_CAP: Final = 10_000
# Windows per ReportMetrics call are sent in calls of at most this many bytes: windows holding prediction records
# weigh up to about a megabyte each, and those piled up while the manager was down must not exceed the message limit.
REPORT_BYTES: Final = 8 << 20


@dataclass(frozen=True)
class WindowKey:
    """What a window is about."""

    model: str
    version: str
    revision: int
    shadow: bool = False


@dataclass
class _Window:
    key: WindowKey
    start_ns: int
    latency_bounds: tuple[float, ...]
    score_output: str
    score_bounds: tuple[float, ...]
    sketches: WindowSketches
    requests: int = 0
    errors: int = 0
    fallbacks: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    latency_counts: list[int] = field(default_factory=list)
    max_ms: float = 0.0
    score_counts: list[int] = field(default_factory=list)
    compared: int = 0
    disagreed: int = 0
    abs_diff_sum: float = 0.0
    dropped: int = 0

    def __post_init__(self) -> None:
        self.latency_counts = [0] * (len(self.latency_bounds) + 1)
        self.score_counts = [0] * (len(self.score_bounds) + 1)

    def _percentile(self, q: float) -> float:
        # The upper bound of the bucket holding the q-quantile (the max for the overflow bucket).
        rank = q * sum(self.latency_counts)
        for bound, count in zip(
            (*self.latency_bounds, self.max_ms), itertools.accumulate(self.latency_counts), strict=True
        ):
            if count >= rank and count > 0:
                return min(bound, self.max_ms)
        return self.max_ms

    def message(self, window_id: str, end_ns: int) -> routing_pb2.MetricsWindow:
        key = self.key
        message = routing_pb2.MetricsWindow(
            model_name=key.model,
            version=int(key.version) if key.version.isdigit() else 0,
            shadow=key.shadow,
            request_count=self.requests,
            error_count=self.errors,
            fallback_count=self.fallbacks,
            window_id=window_id,
            route_revision=key.revision,
            status_counts=dict(self.statuses),
            latency=routing_pb2.LatencySummary(
                p50_ms=self._percentile(0.5),
                p90_ms=self._percentile(0.9),
                p99_ms=self._percentile(0.99),
                max_ms=self.max_ms,
                histogram=statistics_pb2.Histogram(
                    bucket_bounds=self.latency_bounds, bucket_counts=self.latency_counts
                ),
            ),
        )
        message.window_start.FromNanoseconds(self.start_ns)
        message.window_end.FromNanoseconds(end_ns)
        if self.score_bounds and any(self.score_counts):
            message.score_histograms.add(
                output_name=self.score_output,
                histogram=statistics_pb2.Histogram(bucket_bounds=self.score_bounds, bucket_counts=self.score_counts),
            )
        if key.shadow:
            message.shadow_comparison.CopyFrom(
                routing_pb2.ShadowComparison(
                    compared=self.compared,
                    disagreed=self.disagreed,
                    abs_diff_sum=self.abs_diff_sum,
                    dropped=self.dropped,
                )
            )
        self.sketches.fill(message)
        return message


def _bucket(bounds: Sequence[float], value: float) -> int:
    # Bounds are inclusive upper bounds: a value equal to a bound falls in that bound's bucket.
    return bisect.bisect_left(bounds, value)


class MetricWindows:
    """The open windows of this gateway; `roll` closes them into messages with unique ids."""

    def __init__(
        self,
        gateway_id: str,
        clock_ns: Callable[[], int] = time.time_ns,
        *,
        value_sketches: bool = True,
        record_cap: int = DEFAULT_RECORD_CAP,
    ) -> None:
        self.value_sketches = value_sketches
        self.record_cap = record_cap
        self._prefix = f"{gateway_id}/{uuid.uuid4().hex[:12]}"  # a restart never reuses an id
        self._clock_ns = clock_ns
        self._sequence = itertools.count(1)
        self._open: dict[WindowKey, _Window] = {}
        self._start_ns = clock_ns()

    def _window(
        self, key: WindowKey, metrics: MetricsConfig, score_output: str, score_bounds: tuple[float, ...]
    ) -> _Window:
        window = self._open.get(key)
        if window is None:
            window = self._open[key] = _Window(
                key,
                self._start_ns,
                metrics.latency_bounds_ms,
                score_output,
                score_bounds,
                WindowSketches(self.record_cap),
            )
        elif score_output and not window.score_output:  # opened by a comparison, before any score
            window.score_output, window.score_bounds = score_output, score_bounds
            window.score_counts = [0] * (len(score_bounds) + 1)
        return window

    def record(
        self,
        key: WindowKey,
        metrics: MetricsConfig,
        status: str,
        latency_ms: float,
        *,
        count: int = 1,
        scores: Sequence[float | None] = (),
        score_output: str = "",
        score_bounds: tuple[float, ...] = (),
        fallback: bool = False,
        called: Called | None = None,
        predictions: Sequence[tuple[str, str]] = (),
    ) -> None:
        """`count` requests to `key`'s version with one status code name and latency: the scores of their
        answers (None for an answer without one), the inputs the version was called with, and the
        predictions, (request id, unit id) per score, to keep for late labels (live windows)."""
        window = self._window(key, metrics, score_output, score_bounds)
        window.requests += count
        window.statuses[status] += count
        if status != "OK":
            window.errors += count
        if fallback:
            window.fallbacks += count
        window.latency_counts[_bucket(window.latency_bounds, latency_ms)] += count
        window.max_ms = max(window.max_ms, latency_ms)
        present = [score for score in scores if score is not None]
        if window.score_bounds:
            for score in present:
                window.score_counts[_bucket(window.score_bounds, score)] += 1
        if self.value_sketches:
            if present:
                window.sketches.add_scores(window.score_output, present)
            if called is not None:
                window.sketches.add_inputs(called)
        if predictions:
            window.sketches.keep(predictions, scores, self._clock_ns())

    def compare(self, key: WindowKey, metrics: MetricsConfig, disagreed: bool, abs_diff: float) -> None:
        """One mirrored answer compared with the answer served."""
        window = self._window(key, metrics, "", ())
        window.compared += 1
        window.disagreed += disagreed
        window.abs_diff_sum += abs_diff

    def drop(self, key: WindowKey, metrics: MetricsConfig) -> None:
        """One mirrored request dropped because the shadow queue was full."""
        self._window(key, metrics, "", ()).dropped += 1

    def roll(self) -> list[routing_pb2.MetricsWindow]:
        """Close the open windows, each with a new id, and start the next ones."""
        end = self._clock_ns()
        closed = [w.message(f"{self._prefix}/{next(self._sequence)}", end) for w in self._open.values()]
        self._open = {}
        self._start_ns = end
        return closed


class WindowReporter:
    """Sends closed windows with ReportMetrics every window length; a failed report is retried with
    the same window ids, and a window still unsent after `max_attempts` is dropped and counted. Windows go in
    calls of at most `max_report_bytes` (a single larger window alone)."""

    def __init__(
        self,
        windows: MetricWindows,
        channel_factory: Callable[[str], aio.Channel],
        address: str,
        gateway_id: str,
        window_s: Callable[[], float],
        registry: CollectorRegistry,
        max_attempts: int = 6,
        max_pending: int = 10_000,
        max_report_bytes: int = REPORT_BYTES,
    ) -> None:
        self.windows = windows
        self._channel = channel_factory(address)
        self._stub: pb_grpc.ModelManagerServiceAsyncStub = pb_grpc.ModelManagerServiceStub(self._channel)
        self._gateway_id = gateway_id
        self._window_s = window_s
        self._max_attempts = max_attempts
        self._max_pending = max_pending
        self._max_report_bytes = max_report_bytes
        self.pending: list[tuple[routing_pb2.MetricsWindow, int]] = []  # (window, failed attempts)
        self.sent_ids: list[str] = []
        self.dropped = PromCounter(
            "fresco_gateway_metric_windows_dropped", "Metric windows dropped unsent after retries.", registry=registry
        )
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Report in the background until `close`."""
        self._task = asyncio.create_task(self._run(), name="metric-windows")

    async def _run(self) -> None:
        last = time.monotonic()
        while True:
            # Short naps: a window length that a new route table brings applies at once, not after the old length.
            await asyncio.sleep(min(self._window_s(), _NAP_S))
            if time.monotonic() - last >= self._window_s():
                last = time.monotonic()
                await self.flush()

    async def flush(self) -> None:
        """Close the open windows and send everything pending."""
        self.pending.extend((w, 0) for w in self.windows.roll())
        if len(self.pending) > self._max_pending:
            overflow = len(self.pending) - self._max_pending
            self.dropped.inc(overflow)
            self.pending = self.pending[overflow:]
        pending, self.pending = self.pending, []
        for start, end in self._calls(pending):
            windows = pending[start:end]
            request = pb.ReportMetricsRequest(gateway_id=self._gateway_id, windows=[w for w, _ in windows])
            try:
                await self._stub.ReportMetrics(request, timeout=_REPORT_TIMEOUT_S)
            except aio.AioRpcError as err:  # this call's windows and the rest wait for the next flush
                rest = pending[start:]
                kept = [(w, n + 1) for w, n in rest if n + 1 < self._max_attempts]
                self.dropped.inc(len(rest) - len(kept))
                log.info("metric report failed (%s): %d windows kept for retry", err.code().name, len(kept))
                self.pending = kept + self.pending
                break
            self.sent_ids.extend(w.window_id for w, _ in windows)
        del self.sent_ids[:-1000]

    def _calls(self, pending: list[tuple[routing_pb2.MetricsWindow, int]]) -> list[tuple[int, int]]:
        """(start, end) of the pending windows each ReportMetrics call sends, each call within the byte budget."""
        calls: list[tuple[int, int]] = []
        start = size = 0
        for index, (window, _) in enumerate(pending):
            weight = window.ByteSize()
            if index > start and size + weight > self._max_report_bytes:
                calls.append((start, index))
                start, size = index, 0
            size += weight
        if start < len(pending):
            calls.append((start, len(pending)))
        return calls

    async def close(self) -> None:
        """Stop reporting, after one last attempt."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self.flush()
        finally:
            await self._channel.close()
