"""Drift of one feature or score over one window: the served sketch against the version's training statistics.

- PSI and Jensen-Shannon over training's decile bins (from its KLL sketch, else its histogram's buckets; for
  categories, training's categories plus one bin for the rest), proportions floored at 1e-4 for PSI.
- Kolmogorov-Smirnov from the two KLL sketches (sup |F_served - F_training| over every retained item); against a
  histogram only, over its bucket bounds (a lower bound of the true distance).
- The null rate's rise over training's, and the share of served values outside training's [min, max] (or in
  categories training never saw), infinities and values of the wrong type included.

A window holding fewer than `min_rows` values is not judged: nothing is breached on too little evidence."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Final

import datasketches
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp
from scipy.spatial.distance import jensenshannon

from fresco.api.features.v1 import statistics_pb2
from fresco.api.models.v1 import monitoring_pb2, registry_pb2
from fresco.monitoring.kll_bytes import kll_problem
from fresco.monitoring.sketches import KLL_K, ColumnSketch

DEFAULT_MIN_ROWS: Final = 1000
DECILES: Final = tuple(i / 10 for i in range(1, 10))
EPSILON: Final = 1e-4  # proportions floor for PSI, so an empty bin stays finite
CATEGORY_BINS: Final = 10  # training's most frequent categories get a bin each; the rest share one
PSI: Final = int(monitoring_pb2.DRIFT_STATISTIC_PSI)
KS: Final = int(monitoring_pb2.DRIFT_STATISTIC_KS)
JS: Final = int(monitoring_pb2.DRIFT_STATISTIC_JS)
NULL_RATE: Final = int(monitoring_pb2.DRIFT_STATISTIC_NULL_RATE)
OUT_OF_RANGE: Final = int(monitoring_pb2.DRIFT_STATISTIC_OUT_OF_RANGE)


@dataclass(frozen=True)
class Limits:
    """The thresholds a feature's drift is judged against."""

    max_psi: float = 0.1
    max_ks: float = 0.1
    max_js: float = 0.1
    max_null_rate_increase: float = 0.05
    max_out_of_range_rate: float = 0.05

    def of(self, statistic: int) -> float:
        """The threshold of one statistic."""
        return {
            PSI: self.max_psi,
            KS: self.max_ks,
            JS: self.max_js,
            NULL_RATE: self.max_null_rate_increase,
            OUT_OF_RANGE: self.max_out_of_range_rate,
        }[statistic]

    def overridden(self, message: registry_pb2.DriftLimits) -> Limits:
        """These limits with the fields `message` sets."""
        changes = {field.name: value for field, value in message.ListFields()}  # proto3 optional: the set ones
        return replace(self, **changes)


DEFAULT_LIMITS: Final = Limits()


def limits_for(policy: registry_pb2.DriftPolicy | None, name: str) -> Limits:
    """The limits of one feature or score: the defaults, the policy's defaults, then its override for `name`."""
    limits = DEFAULT_LIMITS
    if policy is None:
        return limits
    if policy.HasField("defaults"):
        limits = limits.overridden(policy.defaults)
    if name in policy.overrides:
        limits = limits.overridden(policy.overrides[name])
    return limits


def min_rows(policy: registry_pb2.DriftPolicy | None) -> int:
    """The least values a window needs before it is judged."""
    return policy.min_rows if policy is not None and policy.min_rows > 0 else DEFAULT_MIN_ROWS


@dataclass(frozen=True)
class Drift:
    """One feature's or score's drift over one window. A statistic is None when it could not be measured."""

    name: str
    count: int
    null_rate: float
    training_null_rate: float
    invalid_count: int
    served_min: float | None
    served_max: float | None
    psi: float | None
    ks: float | None
    js: float | None
    out_of_range: float | None
    null_rate_increase: float | None
    judged: bool
    note: str
    breached: tuple[int, ...]
    distribution_judged: bool = False  # PSI, KS and JS had min_rows values of the compared kind

    def values(self) -> dict[int, float]:
        """The statistics measured, by DriftStatistic."""
        candidates = {
            PSI: self.psi,
            KS: self.ks,
            JS: self.js,
            NULL_RATE: self.null_rate_increase,
            OUT_OF_RANGE: self.out_of_range,
        }
        return {statistic: value for statistic, value in candidates.items() if value is not None}

    def measures(self, limits: Limits) -> list[monitoring_pb2.DriftMeasure]:
        """Each statistic measured, against its threshold."""
        return [
            monitoring_pb2.DriftMeasure(
                statistic=statistic,  # type: ignore[arg-type]
                value=value,
                threshold=limits.of(statistic),
                breached=statistic in self.breached,
            )
            for statistic, value in self.values().items()
        ]

    def to_proto(self, window: str, start_ns: int, end_ns: int, limits: Limits) -> monitoring_pb2.FeatureDriftWindow:
        """The wire form of this window."""
        start, end = Timestamp(), Timestamp()
        start.FromNanoseconds(start_ns)
        end.FromNanoseconds(end_ns)
        message = monitoring_pb2.FeatureDriftWindow(
            window=window,
            window_start=start,
            window_end=end,
            count=self.count,
            null_rate=self.null_rate,
            training_null_rate=self.training_null_rate,
            invalid_count=self.invalid_count,
            measures=self.measures(limits),
            judged=self.judged,
            drifted=bool(self.breached),
            note=self.note,
        )
        if self.served_min is not None and self.served_max is not None:
            message.served_min = self.served_min
            message.served_max = self.served_max
        return message


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two proportion vectors over the same bins."""
    p = np.maximum(expected, EPSILON)
    q = np.maximum(actual, EPSILON)
    return float(np.sum((q - p) * np.log(q / p)))


def js_distance(expected: np.ndarray, actual: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) of two proportion vectors over the same bins."""
    if expected.sum() <= 0 or actual.sum() <= 0:
        return 0.0
    return float(jensenshannon(expected, actual, base=2))


def _training_kll(numeric: statistics_pb2.NumericStatistics) -> datasketches.kll_doubles_sketch | None:
    if not numeric.kll_sketch or kll_problem(numeric.kll_sketch, KLL_K) is not None:
        return None  # checked first: corrupt bytes can crash the library; the histogram serves instead
    try:
        sketch = datasketches.kll_doubles_sketch.deserialize(numeric.kll_sketch)
    except (ValueError, RuntimeError, IndexError, MemoryError):  # a corrupt sketch: fall back to the histogram
        return None
    return None if sketch.is_empty() else sketch


def _numeric_bins(
    served: datasketches.kll_doubles_sketch, numeric: statistics_pb2.NumericStatistics
) -> tuple[np.ndarray, np.ndarray, float | None] | None:
    """Training's and the served proportions over training's bins, and the KS distance; None without bins."""
    trained = _training_kll(numeric)
    if trained is not None:
        edges = np.unique(trained.get_quantiles(list(DECILES), inclusive=True))
        if edges.size == 0:
            return None
        expected = np.asarray(trained.get_pmf(edges.tolist(), inclusive=True))
        actual = np.asarray(served.get_pmf(edges.tolist(), inclusive=True))
        points = np.unique([item for sketch in (served, trained) for item, _ in sketch])
        served_cdf = np.asarray(served.get_cdf(points.tolist(), inclusive=True))[:-1]
        trained_cdf = np.asarray(trained.get_cdf(points.tolist(), inclusive=True))[:-1]
        return expected, actual, float(np.max(np.abs(served_cdf - trained_cdf)))
    histogram = numeric.histogram
    counts = np.asarray(histogram.bucket_counts, dtype=np.float64)
    if not histogram.bucket_bounds or len(counts) != len(histogram.bucket_bounds) + 1 or counts.sum() <= 0:
        return None
    expected = counts / counts.sum()
    actual = np.asarray(served.get_pmf(list(histogram.bucket_bounds), inclusive=True))
    ks = float(np.max(np.abs(np.cumsum(expected)[:-1] - np.cumsum(actual)[:-1])))
    return expected, actual, ks


def training_range(numeric: statistics_pb2.NumericStatistics) -> tuple[float, float] | None:
    """Training's [min, max]: from its KLL sketch, else from min and max when the statistics were computed in full
    (percentiles present, or min < max); None when only a histogram was given (proto3 cannot tell an unset min)."""
    trained = _training_kll(numeric)
    if trained is not None:
        return float(trained.get_min_value()), float(trained.get_max_value())
    if numeric.percentiles or numeric.min < numeric.max:
        return numeric.min, numeric.max
    return None


def _outside(served: ColumnSketch, span: tuple[float, float]) -> int:
    """Served finite numbers below training's min or above its max (estimated from the sketch)."""
    kll = served.kll
    if kll.is_empty():
        return 0
    below: float = kll.get_rank(span[0], inclusive=False)
    above: float = 1.0 - kll.get_rank(span[1], inclusive=True)
    numbers: int = kll.n
    return round((below + above) * numbers)


def _categorical_bins(
    served: ColumnSketch, categorical: statistics_pb2.CategoricalStatistics, training_values: int
) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Training's and the served proportions over training's CATEGORY_BINS most frequent categories plus one bin for
    the rest (as decile bins do for numbers: many sparse bins would make PSI and JS noise), and the served values in
    categories training never saw (None when that cannot be told: training's list or the served one incomplete)."""
    top = sorted(categorical.top_categories, key=lambda c: -c.count)[:CATEGORY_BINS]
    listed = np.asarray([c.count for c in top], dtype=np.float64)
    expected = np.append(listed, max(training_values - listed.sum(), 0.0))
    served_total = served.categorical_count()
    in_listed = np.asarray([served.categories.get(c.value, 0) for c in top], dtype=np.float64)
    actual = np.append(in_listed, served_total - in_listed.sum())
    known = {c.value for c in categorical.top_categories}
    complete = categorical.distinct_count == len(known) > 0 and served.other_categories == 0
    unseen = sum(n for value, n in served.categories.items() if value not in known) if complete else None
    return expected / max(expected.sum(), 1.0), actual / max(actual.sum(), 1.0), unseen


def measure(
    served: ColumnSketch,
    training: statistics_pb2.FeatureStatistics | None,
    limits: Limits,
    min_rows: int = DEFAULT_MIN_ROWS,
) -> Drift:
    """The drift of `served` from `training` (the version's statistics of the same name)."""
    count, kll = served.count, served.kll
    values = count - served.null_count
    judged = count >= min_rows
    measured: dict[int, float] = {}
    notes: list[str] = []
    bins: tuple[np.ndarray, np.ndarray, float | None] | None = None
    training_null_rate = 0.0
    if training is None or training.count <= 0:
        notes.append("no training statistics for this name: nothing to compare with")
        judged = False
    else:
        training_null_rate = training.null_rate or training.null_count / training.count
        measured[NULL_RATE] = (served.null_count / count if count else 0.0) - training_null_rate
        bins, outside = _compare(served, training, notes)
        if outside is not None:
            measured[OUT_OF_RANGE] = outside / values if values else 0.0
    distribution_judged = judged and bins is not None and _binned_values(served, training) >= min_rows
    if bins is not None:
        expected, actual, ks = bins
        measured[PSI] = psi(expected, actual)
        measured[JS] = js_distance(expected, actual)
        if ks is not None:
            measured[KS] = ks
    if training is not None and not judged:
        notes.append(f"{count} values in the window, fewer than the {min_rows} needed to judge drift")
    elif bins is not None and not distribution_judged:
        notes.append(f"fewer than {min_rows} non-null values: PSI, KS and JS are not judged")
    breached = tuple(
        statistic
        for statistic, value in measured.items()
        if judged
        and (distribution_judged or statistic not in (PSI, KS, JS))
        and math.isfinite(value)
        and value > limits.of(statistic)
    )
    return Drift(
        name=served.name,
        count=count,
        null_rate=served.null_count / count if count else 0.0,
        training_null_rate=training_null_rate,
        invalid_count=served.invalid_count,
        served_min=None if kll.is_empty() else float(kll.get_min_value()),
        served_max=None if kll.is_empty() else float(kll.get_max_value()),
        psi=measured.get(PSI),
        ks=measured.get(KS),
        js=measured.get(JS),
        out_of_range=measured.get(OUT_OF_RANGE),
        null_rate_increase=measured.get(NULL_RATE),
        judged=judged,
        note="; ".join(notes),
        breached=breached,
        distribution_judged=distribution_judged,
    )


def _compare(
    served: ColumnSketch, training: statistics_pb2.FeatureStatistics, notes: list[str]
) -> tuple[tuple[np.ndarray, np.ndarray, float | None] | None, int | None]:
    """The proportions over training's bins with the KS distance, and the served values outside what training saw
    (None when that cannot be told)."""
    if training.HasField("numeric"):
        bins = None
        if not served.kll.is_empty():
            bins = _numeric_bins(served.kll, training.numeric)
            if bins is None:
                notes.append("training statistics carry no KLL sketch or histogram: no PSI, KS or JS")
        wrong_type = served.categorical_count()  # text where training saw numbers
        span = training_range(training.numeric)
        if span is None:
            notes.append("training statistics give no [min, max]: values out of range are not counted")
            return bins, None
        return bins, _outside(served, span) + served.invalid_count + wrong_type
    if training.HasField("categorical"):
        expected, actual, unseen = _categorical_bins(served, training.categorical, training.count - training.null_count)
        if unseen is None:
            notes.append("training's or the served category list is incomplete: unseen categories are not counted")
            return (expected, actual, None), None
        numbers = served.numeric_count() + served.invalid_count  # numbers where training saw categories
        return (expected, actual, None), unseen + numbers
    notes.append("training statistics hold neither numeric nor categorical statistics")
    return None, None


def _binned_values(served: ColumnSketch, training: statistics_pb2.FeatureStatistics | None) -> int:
    """The served values the distribution statistics were computed over."""
    if training is None:
        return 0
    return served.numeric_count() if training.HasField("numeric") else served.categorical_count()
