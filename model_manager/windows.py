"""Metric windows the gateways report, deduplicated by id and merged per model version for analysis."""

from __future__ import annotations

import bisect
import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fresco.monitoring.sketches import ColumnSketch
from model_manager.window_sketches import (
    SketchKey,
    WindowSketch,
    merge_sketches,
    sketches_from_list,
    sketches_to_list,
)

# Latency bucket upper bounds in milliseconds that the manager publishes to gateways; windows must use them so
# histograms from every gateway merge exactly.
LATENCY_BOUNDS_MS: tuple[float, ...] = (
    1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0, 100.0,
    150.0, 200.0, 300.0, 500.0, 750.0, 1000.0, 2000.0, 5000.0,
)  # fmt: skip

# The gRPC status code names a window may count.
STATUS_CODES = frozenset(
    {
        "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
        "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
        "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
    }
)  # fmt: skip

# Failures of the serving side. RESOURCE_EXHAUSTED is here because a predictor answers it when its queue is full,
# and DEADLINE_EXCEEDED because a slower version runs out of the same deadlines its baseline meets. Every other
# non-OK code is the caller's doing (bad input, auth, cancellation) and never counts against a version.
SERVER_ERROR_CODES = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)


class WindowError(ValueError):
    """A window that cannot be accepted; the message names the field and what was expected."""


@dataclass(frozen=True)
class Histogram:
    """Counts per bucket: `bounds` are ascending inclusive upper bounds; `counts` has one more entry (overflow)."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        if any(not math.isfinite(b) for b in self.bounds):
            raise WindowError("bucket_bounds: expected finite numbers")
        if any(b >= c for b, c in zip(self.bounds, self.bounds[1:], strict=False)):
            raise WindowError("bucket_bounds: expected strictly ascending bounds")
        if len(self.counts) != len(self.bounds) + 1:
            raise WindowError(
                f"bucket_counts: expected {len(self.bounds) + 1} counts (one per bound plus overflow), "
                f"got {len(self.counts)}"
            )
        if any(c < 0 for c in self.counts):
            raise WindowError("bucket_counts: expected non-negative counts")

    @classmethod
    def empty(cls, bounds: Iterable[float]) -> Histogram:
        """A histogram with no observations."""
        b = tuple(float(x) for x in bounds)
        return cls(b, (0,) * (len(b) + 1))

    @classmethod
    def of(cls, bounds: Iterable[float], values: Iterable[float]) -> Histogram:
        """Counts `values` into buckets with these bounds (a value equal to a bound falls in that bound's bucket)."""
        b = tuple(float(x) for x in bounds)
        counts = [0] * (len(b) + 1)
        for v in values:
            counts[bisect.bisect_left(b, v)] += 1
        return cls(b, tuple(counts))

    @property
    def total(self) -> int:
        """The number of observations."""
        return sum(self.counts)

    def merge(self, other: Histogram) -> Histogram:
        """The sum of two histograms with the same bounds."""
        if other.bounds != self.bounds:
            raise WindowError("bucket_bounds: histograms to merge must have the same bounds")
        return Histogram(self.bounds, tuple(a + b for a, b in zip(self.counts, other.counts, strict=True)))

    def quantile(self, q: float, lower: float = 0.0) -> float:
        """The q-quantile, interpolated linearly inside its bucket (as Prometheus does); `lower` bounds bucket 0.

        Returns +inf when the quantile lies in the overflow bucket, and nan when the histogram is empty.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError("q: expected a value in [0, 1]")
        n = self.total
        if n == 0:
            return math.nan
        rank = q * n
        cumulative = 0
        for i, c in enumerate(self.counts):
            if c and cumulative + c >= rank:
                if i == len(self.bounds):
                    return math.inf
                lo = self.bounds[i - 1] if i else min(lower, self.bounds[0])
                return lo + (self.bounds[i] - lo) * max(rank - cumulative, 0.0) / c
            cumulative += c
        return math.inf  # unreachable: the last non-empty bucket always reaches the rank

    def count_above(self, threshold: float) -> int:
        """Observations certainly above `threshold`: the buckets whose lower edge is at or above it."""
        # Bucket i holds (bounds[i-1], bounds[i]]; it lies wholly above t when bounds[i-1] >= t.
        first = bisect.bisect_left(self.bounds, threshold) + 1
        return sum(self.counts[first:])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {"bounds": list(self.bounds), "counts": list(self.counts)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Histogram:
        """The inverse of `to_dict`."""
        return cls(tuple(float(b) for b in d["bounds"]), tuple(int(c) for c in d["counts"]))


@dataclass(frozen=True)
class ShadowComparison:
    """Mirrored requests compared with the answer served: how many, how many disagreed, and the score gap."""

    compared: int = 0
    disagreed: int = 0
    abs_diff_sum: float = 0.0
    dropped: int = 0

    def __post_init__(self) -> None:
        if self.compared < 0 or self.dropped < 0:
            raise WindowError("shadow: expected non-negative compared and dropped counts")
        if not 0 <= self.disagreed <= self.compared:
            raise WindowError("shadow.disagreed: expected a count between 0 and shadow.compared")
        if not (math.isfinite(self.abs_diff_sum) and self.abs_diff_sum >= 0.0):
            raise WindowError("shadow.abs_diff_sum: expected a finite non-negative number")

    def merge(self, other: ShadowComparison) -> ShadowComparison:
        """The sum of two comparisons."""
        return ShadowComparison(
            self.compared + other.compared,
            self.disagreed + other.disagreed,
            self.abs_diff_sum + other.abs_diff_sum,
            self.dropped + other.dropped,
        )


@dataclass(frozen=True)
class MetricWindow:
    """What one gateway saw of one model version under one route revision over about ten seconds."""

    window_id: str
    gateway_id: str
    model: str
    version: int
    route_revision: int
    start: float
    end: float
    status_counts: Mapping[str, int]
    latency_ms: Histogram
    scores: Mapping[str, Histogram] = field(default_factory=dict)
    mirrored: bool = False
    shadow: ShadowComparison | None = None
    sketches: tuple[WindowSketch, ...] = ()  # one per input feature and score output, checked on arrival

    def __post_init__(self) -> None:
        if not self.window_id:
            raise WindowError("window_id: expected a non-empty id, unique per window, so a retry counts once")
        if not self.model:
            raise WindowError("model: expected a model name")
        if self.version <= 0:
            raise WindowError("version: expected a positive version number")
        if self.route_revision < 0:
            raise WindowError("route_revision: expected a non-negative revision")
        if not (math.isfinite(self.start) and math.isfinite(self.end) and self.start < self.end):
            raise WindowError("end: expected a finite window end after its start")
        for code, count in self.status_counts.items():
            if code not in STATUS_CODES:
                raise WindowError(f"status_counts: {code!r} is not a gRPC status code name")
            if count < 0:
                raise WindowError(f"status_counts[{code}]: expected a non-negative count")
        if self.latency_ms.total > self.requests:
            raise WindowError("latency_ms: expected no more observations than requests counted by status")
        if self.shadow is not None and not self.mirrored:
            raise WindowError("shadow: comparisons belong to a mirrored window (mirrored=true)")

    @property
    def requests(self) -> int:
        """Requests of every status."""
        return sum(self.status_counts.values())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "window_id": self.window_id,
            "gateway_id": self.gateway_id,
            "model": self.model,
            "version": self.version,
            "route_revision": self.route_revision,
            "start": self.start,
            "end": self.end,
            "status_counts": dict(self.status_counts),
            "latency_ms": self.latency_ms.to_dict(),
            "scores": {k: h.to_dict() for k, h in self.scores.items()},
            "mirrored": self.mirrored,
            "shadow": None if self.shadow is None else vars(self.shadow).copy(),
            "sketches": sketches_to_list(self.sketches),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MetricWindow:
        """The inverse of `to_dict`."""
        return cls(
            window_id=d["window_id"],
            gateway_id=d["gateway_id"],
            model=d["model"],
            version=int(d["version"]),
            route_revision=int(d["route_revision"]),
            start=float(d["start"]),
            end=float(d["end"]),
            status_counts={k: int(v) for k, v in d["status_counts"].items()},
            latency_ms=Histogram.from_dict(d["latency_ms"]),
            scores={k: Histogram.from_dict(h) for k, h in d["scores"].items()},
            mirrored=bool(d["mirrored"]),
            shadow=None if d["shadow"] is None else ShadowComparison(**d["shadow"]),
            sketches=sketches_from_list(d.get("sketches", ())),  # absent in windows stored before sketches
        )


@dataclass(frozen=True)
class VersionMetrics:
    """Windows of one model version merged over a span: what the analysis of a step reads."""

    model: str
    version: int
    status_counts: Mapping[str, int]
    latency_ms: Histogram
    scores: Mapping[str, Histogram]
    shadow: ShadowComparison
    windows: int
    start: float | None
    end: float | None
    # Value sketches merged per (kind, name); only when asked for (`sketches=True`), as merging them costs.
    sketches: Mapping[SketchKey, ColumnSketch] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        """Requests of every status."""
        return sum(self.status_counts.values())

    @property
    def server_errors(self) -> int:
        """Requests that failed on the serving side."""
        return sum(c for code, c in self.status_counts.items() if code in SERVER_ERROR_CODES)

    @property
    def client_errors(self) -> int:
        """Requests the caller got wrong; they are not judged."""
        return sum(c for code, c in self.status_counts.items() if code not in SERVER_ERROR_CODES and code != "OK")

    @property
    def judged(self) -> int:
        """Requests whose outcome says something about the version: successes and server errors."""
        return self.requests - self.client_errors


class Admission(enum.Enum):
    """What a ledger did with a reported window."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    STALE = "stale"


class WindowLedger:
    """Every accepted window by id, so a retried report counts once; merges them per model version on demand."""

    def __init__(self, latency_bounds: Iterable[float] = LATENCY_BOUNDS_MS) -> None:
        self.latency_bounds = tuple(float(b) for b in latency_bounds)
        self._windows: dict[str, MetricWindow] = {}
        self._by_version: dict[tuple[str, int, bool], dict[str, MetricWindow]] = {}
        self._score_bounds: dict[tuple[str, int, str], tuple[float, ...]] = {}
        self._horizon = -math.inf

    def __len__(self) -> int:
        return len(self._windows)

    def windows(self) -> list[MetricWindow]:
        """Every window held."""
        return list(self._windows.values())

    def add(self, window: MetricWindow) -> Admission:
        """Records a window once; a retry with the same id and content is a duplicate, other content an error."""
        seen = self._windows.get(window.window_id)
        if seen is not None:
            if seen != window:
                raise WindowError(f"window_id: {window.window_id!r} was already reported with different content")
            return Admission.DUPLICATE
        if window.end <= self._horizon:
            return Admission.STALE
        if window.latency_ms.bounds != self.latency_bounds:
            raise WindowError("latency_ms.bucket_bounds: expected the bounds the manager publishes")
        for name, hist in window.scores.items():
            known = self._score_bounds.get((window.model, window.version, name))
            if known is not None and known != hist.bounds:
                raise WindowError(
                    f"scores[{name}].bucket_bounds: expected the bounds of earlier windows of "
                    f"{window.model} version {window.version}"
                )
        for name, hist in window.scores.items():
            self._score_bounds[(window.model, window.version, name)] = hist.bounds
        self._windows[window.window_id] = window
        self._by_version.setdefault((window.model, window.version, window.mirrored), {})[window.window_id] = window
        return Admission.ACCEPTED

    def prune(self, before: float) -> int:
        """Forgets windows that ended at or before `before`; later reports of such windows are STALE."""
        old = [k for k, w in self._windows.items() if w.end <= before]
        for k in old:
            w = self._windows.pop(k)
            del self._by_version[(w.model, w.version, w.mirrored)][k]
        self._horizon = max(self._horizon, before)
        return len(old)

    def merged(
        self,
        model: str,
        version: int,
        *,
        since: float = -math.inf,
        until: float = math.inf,
        min_revision: int = 0,
        mirrored: bool = False,
        sketches: bool = False,
    ) -> VersionMetrics:
        """Merges the windows of a version that lie wholly in [since, until] under route revision ≥ min_revision;
        with `sketches`, their value sketches too."""
        chosen = [
            w
            for w in self._by_version.get((model, version, mirrored), {}).values()
            if w.route_revision >= min_revision and w.start >= since and w.end <= until
        ]
        return merge_windows(model, version, chosen, self.latency_bounds, sketches=sketches)


def merge_windows(
    model: str,
    version: int,
    windows: Iterable[MetricWindow],
    latency_bounds: tuple[float, ...],
    *,
    sketches: bool = False,
) -> VersionMetrics:
    """Sums windows of one version: status counts, histograms per name, shadow comparisons, and their span (and
    with `sketches`, merges their value sketches)."""
    windows = list(windows)
    status: dict[str, int] = {}
    latency = Histogram.empty(latency_bounds)
    scores: dict[str, Histogram] = {}
    shadow = ShadowComparison()
    count = 0
    start: float | None = None
    end: float | None = None
    for w in windows:
        count += 1
        for code, c in w.status_counts.items():
            status[code] = status.get(code, 0) + c
        latency = latency.merge(w.latency_ms)
        for name, h in w.scores.items():
            scores[name] = scores[name].merge(h) if name in scores else h
        if w.shadow is not None:
            shadow = shadow.merge(w.shadow)
        start = w.start if start is None else min(start, w.start)
        end = w.end if end is None else max(end, w.end)
    merged = merge_sketches(w.sketches for w in windows) if sketches else {}
    return VersionMetrics(model, version, status, latency, scores, shadow, count, start, end, merged)
