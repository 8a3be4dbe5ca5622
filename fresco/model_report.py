"""The model report of one version, the deployment-readiness review: what the registry and the live services say
about it, gathered into plain values. A service that has nothing (or does not answer) is recorded as missing with
the reason; nothing is filled in. `fresco.model_report_html` draws it."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import grpc

from fresco.api.features.v1 import statistics_pb2 as spb
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import monitoring_pb2 as mpb
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.cli_manager import TIMEOUT_S, Manager

# A feature is flagged when its training values look unfit: these are the thresholds.
MOSTLY_NULL_RATE = 0.5
NULLS_NOTED_RATE = 0.05
HIGH_CARDINALITY_SHARE = 0.5
# Codes that mean "this service has nothing for you" rather than "the request is wrong".
ABSENT = frozenset(
    {grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND}
    | {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DEADLINE_EXCEEDED}
)
T = TypeVar("T")


@dataclass(frozen=True)
class FeatureQuality:
    """One training feature's data quality: counts, null rate, range or top category, distinct count and flags."""

    name: str
    count: int
    null_rate: float
    kind: str  # "numeric", "categorical" or "unknown"
    minimum: float | None
    maximum: float | None
    mean: float | None
    distinct: int | None
    top: str
    flags: tuple[str, ...]


@dataclass(frozen=True)
class Fetched(Generic[T]):
    """A service's answer, or why there is none."""

    value: T | None
    missing: str = ""


@dataclass(frozen=True)
class ModelReport:
    """Everything the report page shows about one version."""

    model_name: str
    version: rpb.ModelVersion
    data_quality: tuple[FeatureQuality, ...]
    importance: tuple[tuple[str, float], ...]  # most important first
    backtest: rpb.BacktestReport | None
    quality: Fetched[mpb.VersionQuality]
    monitor: Fetched[mpb.VersionMonitor]
    safety: Fetched[mpb.SafetyScore]
    calibrations: dict[str, rpb.Calibration] = field(default_factory=dict)  # "training", "backtest", "live (1d)"


def feature_quality(stats: spb.FeatureStatistics) -> FeatureQuality:
    """The data quality of one training feature, flagged: empty, mostly null, nulls, constant, high cardinality."""
    present = stats.count - stats.null_count
    flags: list[str] = []
    if stats.count == 0 or present <= 0:
        flags.append("empty: no non-null value")
    elif stats.null_rate >= MOSTLY_NULL_RATE:
        flags.append(f"mostly null ({stats.null_rate:.0%})")
    elif stats.null_rate > NULLS_NOTED_RATE:
        flags.append(f"nulls above {NULLS_NOTED_RATE:.0%} ({stats.null_rate:.1%})")
    minimum = maximum = mean = None
    distinct: int | None = None
    top = ""
    kind = "unknown"
    if stats.HasField("numeric"):
        kind = "numeric"
        minimum, maximum, mean = stats.numeric.min, stats.numeric.max, stats.numeric.mean
        if present > 0 and minimum == maximum:
            flags.append(f"constant ({minimum:g})")
        if not all(math.isfinite(x) for x in (minimum, maximum, mean)):
            flags.append("non-finite statistics")
    elif stats.HasField("categorical"):
        kind = "categorical"
        distinct = stats.categorical.distinct_count
        if stats.categorical.top_categories:
            first = stats.categorical.top_categories[0]
            top = f"{first.value} ({first.fraction:.0%})"
        if present > 0 and distinct == 1:
            flags.append("constant (one category)")
        elif present > 0 and distinct > HIGH_CARDINALITY_SHARE * present:
            flags.append(f"high cardinality ({distinct} distinct of {present})")
    return FeatureQuality(
        stats.feature_name, stats.count, stats.null_rate, kind, minimum, maximum, mean, distinct, top, tuple(flags)
    )


def stored_backtest(version: rpb.ModelVersion) -> rpb.BacktestReport | None:
    """The backtest report among the version's latest gate results, if a backtest gate ran."""
    for result in version.gate_results:
        if result.type == rpb.GATE_TYPE_BACKTEST and result.HasField("backtest"):
            return result.backtest
    return None


def live_calibration(quality: mpb.VersionQuality | None) -> tuple[str, rpb.Calibration] | None:
    """The calibration of the longest live window that has bins."""
    if quality is None:
        return None
    for window in reversed(quality.windows):
        if window.calibration.bins:
            return f"live ({window.window})", window.calibration
    return None


def _ask(call: Callable[[], T | None], what: str) -> Fetched[T]:
    try:
        return Fetched(call())
    except grpc.RpcError as err:
        code = err.code() if isinstance(err, grpc.Call) else None
        if code not in ABSENT:
            raise
        details = err.details() if isinstance(err, grpc.Call) else ""
        return Fetched(None, f"{what}: {code.name if code else 'error'}: {details}")


def collect(m: Manager, model_name: str, number: int) -> ModelReport:
    """Read the version, its monitor, quality and family safety score; the version must exist."""
    request = pb.GetModelVersionRequest(model_name=model_name, version=number)
    version = m.stub.GetModelVersion(request, timeout=TIMEOUT_S, metadata=m.metadata)
    v = version.model_version

    def quality() -> mpb.VersionQuality | None:
        request = pb.GetPredictionQualityRequest(model_name=model_name, versions=[number])
        answer = m.stub.GetPredictionQuality(request, timeout=TIMEOUT_S, metadata=m.metadata)
        return next((q for q in answer.versions if q.version == number), None)

    def monitor() -> mpb.VersionMonitor | None:
        request = pb.GetModelMonitorRequest(model_name=model_name, versions=[number])
        answer = m.stub.GetModelMonitor(request, timeout=TIMEOUT_S, metadata=m.metadata)
        found = next((x for x in answer.versions if x.version == number), None)
        # A version asked for by number is answered even without data: its windows are then all empty.
        return found if found is not None and has_live_data(found) else None

    def safety() -> mpb.SafetyScore:
        request = pb.GetSafetyScoreRequest(model_name=model_name)
        return m.stub.GetSafetyScore(request, timeout=TIMEOUT_S, metadata=m.metadata).safety_score

    return build(
        model_name,
        v,
        _ask(quality, "prediction quality"),
        _ask(monitor, "drift monitor"),
        _ask(safety, "safety score"),
    )


def build(
    model_name: str,
    version: rpb.ModelVersion,
    quality: Fetched[mpb.VersionQuality],
    monitor: Fetched[mpb.VersionMonitor],
    safety: Fetched[mpb.SafetyScore],
) -> ModelReport:
    """The report from what was read."""
    if quality.value is None and not quality.missing:
        quality = Fetched(None, "prediction quality: no labelled predictions for this version")
    if monitor.value is None and not monitor.missing:
        monitor = Fetched(None, "no live data: no sketches reported for this version in the last day")
    backtest = stored_backtest(version)
    calibrations: dict[str, rpb.Calibration] = {}
    if version.report.calibration.bins:
        calibrations["training"] = version.report.calibration
    if backtest is not None and backtest.calibration.bins:
        calibrations["backtest"] = backtest.calibration
    live = live_calibration(quality.value)
    if live is not None:
        calibrations[live[0]] = live[1]
    importance = sorted(version.report.feature_importance.items(), key=lambda kv: (-kv[1], kv[0]))
    return ModelReport(
        model_name=model_name,
        version=version,
        data_quality=tuple(feature_quality(s) for s in version.training_statistics),
        importance=tuple(importance),
        backtest=backtest,
        quality=quality,
        monitor=monitor,
        safety=safety,
        calibrations=calibrations,
    )


def has_live_data(monitor: mpb.VersionMonitor) -> bool:
    """Whether any window of any feature or score saw a value."""
    return any(w.count > 0 for f in monitor.features for w in f.windows)


def psi_series(monitor: mpb.VersionMonitor) -> list[tuple[str, Sequence[float]]]:
    """(name, PSI history) of each monitored feature and score with any judged bucket."""
    return [(f.name, list(f.psi_history)) for f in monitor.features if any(math.isfinite(x) for x in f.psi_history)]
