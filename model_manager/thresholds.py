"""Backtest thresholds: each metric limit, absolute and relative to production, checked overall and per slice."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager.backtest import Scored
from model_manager.gate_results import check, error
from model_manager.metrics import HIGHER_IS_BETTER, Evaluation

BACKTEST = rpb.GATE_TYPE_BACKTEST
DEFAULT_MIN_SLICE_ROWS = 100


@dataclass(frozen=True)
class Threshold:
    """The limits on one metric; None means that limit is not set."""

    metric: str
    higher_is_better: bool
    min_value: float | None = None
    max_value: float | None = None
    max_regression: float | None = None
    max_relative_regression: float | None = None

    @property
    def relative(self) -> bool:
        """Whether a limit compares with the production version."""
        return self.max_regression is not None or self.max_relative_regression is not None


def _optional(message: rpb.BacktestGate | rpb.MetricThreshold, field: str) -> float | None:
    return float(getattr(message, field)) if message.HasField(field) else None  # type: ignore[arg-type]


def thresholds_of(gate: rpb.BacktestGate) -> list[Threshold]:
    """The gate's `metric` limits (their direction from lower_is_better) and each of its `thresholds`."""
    found = []
    if gate.metric:
        found.append(
            Threshold(
                gate.metric,
                not gate.lower_is_better,
                _optional(gate, "min_value"),
                _optional(gate, "max_value"),
                _optional(gate, "max_regression"),
            )
        )
    for t in gate.thresholds:
        found.append(
            Threshold(
                t.metric,
                t.metric in HIGHER_IS_BETTER,
                _optional(t, "min_value"),
                _optional(t, "max_value"),
                _optional(t, "max_regression"),
                _optional(t, "max_relative_regression"),
            )
        )
    return found


@dataclass(frozen=True)
class Baseline:
    """The production version compared with: its number (0 for none) and its scores, or why it has none."""

    version: int
    scored: Scored | None = None
    error: str = ""


def _absolute(t: Threshold, name: str, where: str, value: float) -> list[rpb.GateResult]:
    results = []
    if t.min_value is not None:
        ok = value >= t.min_value
        detail = f"{t.metric} {value:.4f} {'>=' if ok else '<'} min_value {t.min_value:g}{where}"
        results.append(check(f"{name}.min_value", BACKTEST, ok, detail, value, t.min_value))
    if t.max_value is not None:
        ok = value <= t.max_value
        detail = f"{t.metric} {value:.4f} {'<=' if ok else '>'} max_value {t.max_value:g}{where}"
        results.append(check(f"{name}.max_value", BACKTEST, ok, detail, value, t.max_value))
    return results


def _relative(
    t: Threshold, name: str, where: str, value: float, baseline: Baseline, base: Evaluation | None
) -> list[rpb.GateResult]:
    limits = [("max_regression", t.max_regression), ("max_relative_regression", t.max_relative_regression)]
    limits = [(kind, limit) for kind, limit in limits if limit is not None]
    if baseline.version == 0:
        return [
            check(f"{name}.{kind}", BACKTEST, True, f"no production version to compare with{where}", value, limit or 0)
            for kind, limit in limits
        ]
    base_value = base.metrics.get(t.metric) if base is not None else None
    if base_value is None:
        why = baseline.error or (base.missing.get(t.metric, "not measured") if base is not None else "not scored")
        return [
            error(f"{name}.{kind}", BACKTEST, f"production v{baseline.version} has no {t.metric}{where}: {why}")
            for kind, _ in limits
        ]
    worse = base_value - value if t.higher_is_better else value - base_value
    results = []
    for kind, limit in limits:
        assert limit is not None
        if kind == "max_regression":
            measured = worse
            shown = f"worse by {worse:.4f}"
        else:
            measured = worse / abs(base_value) if base_value else (math.inf if worse > 0 else 0.0)
            shown = f"worse by {measured:.2%}"
        ok = measured <= limit
        detail = (
            f"{t.metric} {value:.4f} vs production v{baseline.version} {base_value:.4f}{where}: {shown}, "
            f"{kind} {limit:g}"
        )
        results.append(check(f"{name}.{kind}", BACKTEST, ok, detail, measured, limit))
    return results


def _checks(
    t: Threshold, where: str, candidate: Evaluation, baseline: Baseline, base: Evaluation | None
) -> list[rpb.GateResult]:
    name = f"backtest.{t.metric}" + (f"[{where}]" if where else "")
    on = f" on {where} ({candidate.rows} rows)" if where else f" ({candidate.rows} rows)"
    value = candidate.metrics.get(t.metric)
    if value is None:
        return [error(name, BACKTEST, f"{t.metric} cannot be computed{on}: {candidate.missing.get(t.metric, '')}")]
    results = _absolute(t, name, on, value)
    if t.relative:
        results += _relative(t, name, on, value, baseline, base)
    return results


def check_thresholds(
    thresholds: list[Threshold], candidate: Scored, baseline: Baseline, min_slice_rows: int
) -> list[rpb.GateResult]:
    """Every limit overall, then on every slice with at least `min_slice_rows` rows."""
    base = baseline.scored
    results = []
    for t in thresholds:
        results += _checks(t, "", candidate.evaluation, baseline, base.evaluation if base else None)
    for key, evaluation in candidate.slices.items():
        if evaluation.rows < min_slice_rows:
            continue
        for t in thresholds:
            results += _checks(t, key, evaluation, baseline, base.slices.get(key) if base else None)
    return results
