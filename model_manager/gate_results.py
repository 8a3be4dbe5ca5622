"""GateResult values: one check of a promotion gate, passed or not, with what was measured against what."""

from __future__ import annotations

import time
from collections.abc import Iterable

from fresco.api.models.v1 import registry_pb2 as rpb

ERROR_PREFIX = "error: "


def check(
    name: str,
    gate: rpb.GateType.ValueType,
    passed: bool,
    detail: str,
    measured: float = 0.0,
    threshold: float = 0.0,
) -> rpb.GateResult:
    """One evaluated check, stamped now."""
    result = rpb.GateResult(
        name=name, type=gate, passed=passed, measured_value=measured, threshold=threshold, detail=detail
    )
    result.evaluated_at.FromNanoseconds(time.time_ns())
    return result


def error(name: str, gate: rpb.GateType.ValueType, why: str) -> rpb.GateResult:
    """A check that could not be measured: it counts as failed, and its detail starts with "error: "."""
    return check(name, gate, False, ERROR_PREFIX + why)


def failures(results: Iterable[rpb.GateResult]) -> list[rpb.GateResult]:
    """The checks that did not pass."""
    return [r for r in results if not r.passed]


def summary(results: Iterable[rpb.GateResult]) -> str:
    """The failed checks in one line: "backtest.auc.min_value: auc 0.61 < 0.80; latency.p99: ..."."""
    return "; ".join(f"{r.name}: {r.detail}" for r in failures(results))
