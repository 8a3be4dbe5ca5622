"""The statistics store's domain: what it records (exposures, outcomes, covariates), how a unit's outcomes make
its metric values, and the reader and writer interfaces both backends (SQLite, Redis) implement alike.

Per (experiment, phase, unit) the first exposure is kept with its arm, allocation and time; per metric the unit
holds a raw numerator `num` (the 0/1 "any positive value" flag for PROPORTION, else the sum of value x count), a
`y` (a RATIO's denominator sum, or the CUPED covariate's sum over [exposure - window, exposure)) and `has_y`.
Its contribution to its arm is x = num (capped at `cap` when positive, PROPORTION never), y, has_y; every change
of a unit adds the difference of its contribution to the arm's SufficientStats, so the arm's sums stay the sums
over its units whatever the order rows arrive in.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, Protocol

from experiment_service.sufficient import SufficientStats
from fresco.api.experiments.v1 import experiment_pb2 as epb

PROPORTION = epb.METRIC_KIND_PROPORTION
MEAN = epb.METRIC_KIND_MEAN
RATIO = epb.METRIC_KIND_RATIO
DEFAULT_CUPED_WINDOW_US = 14 * 24 * 3600 * 1_000_000
# The largest |amount| a row may carry. Larger finite amounts overflow a square or a sum to infinity: SQLite would
# keep an infinite sum, and Redis fails its script midway, a batch half recorded and every resend failing too.
MAX_AMOUNT = 1e100
Slot = Literal["x", "y"]


class Verdict(enum.IntEnum):
    """What the store did with one row (the codes the Redis script returns)."""

    ACCEPTED = 0
    DUPLICATE = 1
    CONFLICTING_ARM = 2
    UNIT_NOT_EXPOSED = 3


@dataclass(frozen=True)
class MetricPlan:
    """What the store needs of one metric: its kind, cap, events and CUPED covariate window."""

    name: str
    kind: int
    cap: float
    event: str
    denominator_event: str  # RATIO only
    covariate_event: str  # "" without CUPED (and for RATIO, whose y is its denominator)
    window_us: int


@dataclass(frozen=True)
class StatsPlan:
    """An experiment as the store sees it: its metrics (in order) and its phase numbers."""

    key: str
    metrics: tuple[MetricPlan, ...]
    phases: tuple[int, ...]

    @classmethod
    def of(cls, experiment: epb.Experiment) -> StatsPlan:
        """The plan of an experiment (UNSPECIFIED kinds count as MEAN)."""
        metrics = []
        for spec in experiment.metrics:
            kind = spec.kind or MEAN
            event = spec.event or spec.name
            covariate = ""
            window = DEFAULT_CUPED_WINDOW_US
            if spec.HasField("cuped") and kind != RATIO:
                covariate = spec.cuped.covariate_event or event
                window = spec.cuped.pre_exposure_window.ToMicroseconds() or DEFAULT_CUPED_WINDOW_US
            denominator = spec.denominator_event if kind == RATIO else ""
            metrics.append(MetricPlan(spec.name, kind, max(spec.cap, 0.0), event, denominator, covariate, window))
        return cls(experiment.key, tuple(metrics), tuple(phase.number for phase in experiment.phases))

    def outcome_targets(self, event: str) -> tuple[tuple[int, Slot], ...]:
        """The (metric index, slot) an outcome of `event` updates: x for a metric's event, y for a denominator."""
        targets: list[tuple[int, Slot]] = []
        for index, metric in enumerate(self.metrics):
            if metric.event == event:
                targets.append((index, "x"))
            if metric.denominator_event and metric.denominator_event == event:
                targets.append((index, "y"))
        return tuple(targets)

    def covariate_targets(self, event: str) -> tuple[int, ...]:
        """The indexes of the metrics whose CUPED covariate is `event`."""
        return tuple(i for i, metric in enumerate(self.metrics) if metric.covariate_event == event)

    def encoded(self) -> str:
        """The plan as the Redis script reads it: [[name, kind, cap, covariate_event, window_us]...], [phases]."""
        metrics = [[m.name, m.kind, m.cap, m.covariate_event, m.window_us] for m in self.metrics]
        return json.dumps([metrics, list(self.phases)], separators=(",", ":"))


@dataclass(frozen=True)
class ExposureRow:
    """A validated exposure: the unit (unit_type and id, see unit_key) first seen in an arm of a phase."""

    phase: int
    unit: str
    arm: str
    allocation: int
    at_us: int


@dataclass(frozen=True)
class OutcomeRow:
    """A validated outcome (phase set) or covariate (covariate=True, phase 0) row; amount is value x count."""

    outcome_id: str
    unit: str
    event: str
    amount: float
    at_us: int
    phase: int = 0
    covariate: bool = False


@dataclass(frozen=True)
class Snapshot:
    """The arm statistics of a phase at one time, for the results history."""

    at: datetime
    arms: dict[str, dict[str, SufficientStats]]


def unit_key(unit_type: str, unit_id: str) -> str:
    """One string per unit: the type's length first, so no two (type, id) pairs share a key."""
    return f"{len(unit_type)}:{unit_type}:{unit_id}"


def metric_value(metric: MetricPlan, num: float) -> float:
    """The unit's x from its raw numerator: the flag for PROPORTION, else the sum capped at `cap` when positive."""
    if metric.kind == PROPORTION:
        return num
    return min(num, metric.cap) if metric.cap > 0 else num


def next_num(metric: MetricPlan, num: float, amount: float) -> float:
    """The unit's raw numerator after one more outcome row."""
    if metric.kind == PROPORTION:
        return 1.0 if num > 0 or amount > 0 else 0.0
    return num + amount


def in_window(metric: MetricPlan, at_us: int, exposed_us: int) -> bool:
    """Whether a covariate row at `at_us` is in the pre-exposure window of a unit first exposed at `exposed_us`."""
    return exposed_us - metric.window_us <= at_us < exposed_us


@dataclass(frozen=True)
class Delta:
    """A change of one arm's sums from one unit's change (units added, Σx, Σx², Σy, Σy², Σxy, units with y)."""

    n: int
    sx: float
    sxx: float
    sy: float
    syy: float
    sxy: float
    n_y: int

    @classmethod
    def of(
        cls,
        metric: MetricPlan,
        old: tuple[float, float, int] | None,
        new: tuple[float, float, int],
    ) -> Delta:
        """The change from a unit's old (num, y, has_y) to its new one; old None for a newly exposed unit."""
        x1, y1, h1 = metric_value(metric, new[0]), new[1], new[2]
        if old is None:
            return cls(1, x1, x1 * x1, y1, y1 * y1, x1 * y1, h1)
        x0, y0, h0 = metric_value(metric, old[0]), old[1], old[2]
        return cls(0, x1 - x0, x1 * x1 - x0 * x0, y1 - y0, y1 * y1 - y0 * y0, x1 * y1 - x0 * y0, h1 - h0)


def to_datetime(at_us: int) -> datetime:
    """A UTC datetime from microseconds since the epoch."""
    return datetime.fromtimestamp(at_us / 1_000_000, UTC)


def to_us(at: datetime) -> int:
    """Microseconds since the epoch of an aware datetime."""
    return int(at.timestamp() * 1_000_000)


class StatsReader(Protocol):
    """What analysis and the bandit read: per-arm statistics of one phase of an experiment."""

    async def arm_stats(self, key: str, phase: int) -> dict[str, dict[str, SufficientStats]]:
        """Arm -> metric -> statistics; arms without exposed units are absent."""
        ...

    async def units_by_allocation(self, key: str, phase: int) -> dict[str, dict[int, int]]:
        """Arm -> allocation -> exposed units."""
        ...

    async def snapshots(self, key: str, phase: int) -> list[Snapshot]:
        """The recorded snapshots of the phase, oldest first."""
        ...


class StatsWriter(Protocol):
    """What exposure and outcome logging write; a call returns once its rows are durably recorded."""

    async def record_exposures(self, plan: StatsPlan, rows: Sequence[ExposureRow], now: datetime) -> list[Verdict]:
        """Record exposures of one experiment atomically; one verdict per row, in order."""
        ...

    async def record_outcomes(self, plan: StatsPlan, rows: Sequence[OutcomeRow], now: datetime) -> list[Verdict]:
        """Record outcome and covariate rows of one experiment atomically; one verdict per row, in order."""
        ...

    async def snapshot(self, key: str, phase: int, now: datetime) -> bool:
        """Record a snapshot of the phase now if anything changed since the last one; whether one was taken."""
        ...


class StatsStore(StatsReader, StatsWriter, Protocol):
    """A statistics backend: reads, writes and close."""

    async def close(self) -> None:
        """Release connections and threads."""
        ...


STAT_FIELDS = ("n", "sx", "sxx", "sy", "syy", "sxy", "ny")


def stats_from_fields(fields: dict[str, float]) -> SufficientStats:
    """SufficientStats from a mapping of STAT_FIELDS names (missing ones are 0)."""
    return SufficientStats(
        n=int(fields.get("n", 0)),
        sx=float(fields.get("sx", 0.0)),
        sxx=float(fields.get("sxx", 0.0)),
        sy=float(fields.get("sy", 0.0)),
        syy=float(fields.get("syy", 0.0)),
        sxy=float(fields.get("sxy", 0.0)),
        n_y=int(fields.get("ny", 0)),
    )
