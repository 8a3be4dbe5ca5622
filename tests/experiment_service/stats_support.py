"""Experiments and rows for the statistics store tests, and a reference that computes the sums an arm should hold
from the rows directly (the definition the stores must agree with, whatever order rows arrive in)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from experiment_service.stats_store import (
    ExposureRow,
    MetricPlan,
    OutcomeRow,
    StatsPlan,
    in_window,
    metric_value,
    next_num,
    to_us,
    unit_key,
)
from experiment_service.sufficient import SufficientStats
from fresco.api.experiments.v1 import experiment_pb2 as epb
from fresco.experiments.exposure import exposure_id

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
HOUR_US = 3_600_000_000


def experiment(
    key: str = "checkout", *, phases: int = 1, status: int = epb.EXPERIMENT_STATUS_RUNNING
) -> epb.Experiment:
    """A running two-arm experiment with one metric of each kind, a capped MEAN and a CUPED MEAN."""
    exp = epb.Experiment(key=key, unit_type="user_id", status=status, model_name="ranker")
    exp.arms.add(name="control", weight=0.5, model_version=1)
    exp.arms.add(name="treatment", weight=0.5, model_version=2)
    exp.metrics.add(name="converted", kind=epb.METRIC_KIND_PROPORTION, event="purchase")
    exp.metrics.add(name="revenue", kind=epb.METRIC_KIND_MEAN, event="purchase", cap=100.0)
    exp.metrics.add(name="ctr", kind=epb.METRIC_KIND_RATIO, event="click", denominator_event="view")
    spend = exp.metrics.add(name="spend", kind=epb.METRIC_KIND_MEAN, event="spend")
    spend.cuped.pre_exposure_window.FromSeconds(24 * 3600)
    for number in range(1, phases + 1):
        phase = exp.phases.add(number=number, weights=[0.5, 0.5], experiment_version=number)
        phase.started_at.FromDatetime(T0 + timedelta(days=number - 1))
        if number < phases:
            phase.ended_at.FromDatetime(T0 + timedelta(days=number))
    return exp


def plan(key: str = "checkout", phases: int = 1) -> StatsPlan:
    """The store's plan of experiment(key)."""
    return StatsPlan.of(experiment(key, phases=phases))


def unit(uid: str) -> str:
    """The store key of a user_id unit."""
    return unit_key("user_id", uid)


def exposure(uid: str, arm: str, at_h: float = 0.0, phase: int = 1, allocation: int = 0) -> ExposureRow:
    """An exposure of user `uid` `at_h` hours after T0."""
    return ExposureRow(phase, unit(uid), arm, allocation, to_us(T0) + int(at_h * HOUR_US))


def outcome(oid: str, uid: str, event: str, amount: float, at_h: float = 1.0, phase: int = 1) -> OutcomeRow:
    """An outcome row `at_h` hours after T0."""
    return OutcomeRow(oid, unit(uid), event, amount, to_us(T0) + int(at_h * HOUR_US), phase)


def covariate(oid: str, uid: str, event: str, amount: float, at_h: float = -1.0) -> OutcomeRow:
    """A covariate row `at_h` hours after T0 (before the exposure when negative)."""
    return OutcomeRow(oid, unit(uid), event, amount, to_us(T0) + int(at_h * HOUR_US), covariate=True)


def exposure_proto_id(key: str, phase: int, uid: str, arm: str) -> str:
    """The deterministic id of an exposure of a user_id unit."""
    return exposure_id(key, phase, "user_id", uid, arm)


@dataclass
class Reference:
    """The sums the rows define: each unit's first exposure, its accepted outcomes, its covariates in window."""

    plan: StatsPlan
    exposures: dict[tuple[int, str], ExposureRow] = field(default_factory=dict)
    outcomes: dict[str, OutcomeRow] = field(default_factory=dict)

    def add(self, rows: Iterable[ExposureRow | OutcomeRow]) -> None:
        for row in rows:
            if isinstance(row, ExposureRow):
                kept = self.exposures.get((row.phase, row.unit))
                if kept is None or (kept.arm == row.arm and row.at_us < kept.at_us):
                    self.exposures[(row.phase, row.unit)] = row
            else:
                self.outcomes.setdefault(row.outcome_id, row)

    def arm_stats(self, phase: int = 1) -> dict[str, dict[str, SufficientStats]]:
        out: dict[str, dict[str, SufficientStats]] = {}
        for (p, _), exp in sorted(self.exposures.items()):
            if p != phase:
                continue
            for index, metric in enumerate(self.plan.metrics):
                x, y, h = self._unit(metric, index, exp)
                one = SufficientStats(1, x, x * x, y, y * y, x * y, h)
                arm = out.setdefault(exp.arm, {})
                arm[metric.name] = arm.get(metric.name, SufficientStats()) + one
        return out

    def _unit(self, metric: MetricPlan, index: int, exp: ExposureRow) -> tuple[float, float, int]:
        num, y, h = 0.0, 0.0, 0
        for row in sorted(self.outcomes.values(), key=lambda r: r.outcome_id):
            if row.unit != exp.unit:
                continue
            if row.covariate:
                if metric.covariate_event == row.event and in_window(metric, row.at_us, exp.at_us):
                    y, h = y + row.amount, 1
            elif row.phase == exp.phase and row.at_us >= exp.at_us:
                if metric.event == row.event:
                    num = next_num(metric, num, row.amount)
                if metric.denominator_event and metric.denominator_event == row.event:
                    y, h = y + row.amount, 1
        return metric_value(metric, num), y, h
