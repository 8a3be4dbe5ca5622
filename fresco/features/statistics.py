"""Per-feature statistics of a column of values: count, null rate, mean, std, percentiles and
histogram for numbers, cardinality and top values for categories. Materialisation records them as
the baseline for drift checks and for mean/median/most-frequent imputation; training code computes
the same ones."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fresco.features.definitions import NUMERIC_TYPES, Feature
from fresco.features.policy import Baseline

PERCENTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
HISTOGRAM_BUCKETS = 10
TOP_CATEGORIES = 10


@dataclass(frozen=True)
class NumericSummary:
    """Moments, extremes, percentiles and a histogram of the non-null numbers."""

    mean: float
    std: float
    min: float
    max: float
    percentiles: dict[float, float]
    bucket_bounds: list[float]
    bucket_counts: list[int]


@dataclass(frozen=True)
class CategoricalSummary:
    """Cardinality and most frequent values of the non-null values."""

    distinct_count: int
    top: list[tuple[str, int, float]]


@dataclass(frozen=True)
class FeatureSummary:
    """Statistics of one feature's column."""

    name: str
    count: int
    null_count: int
    numeric: NumericSummary | None = None
    categorical: CategoricalSummary | None = None
    mode: Any = field(default=None, compare=False)

    @property
    def null_rate(self) -> float:
        return self.null_count / self.count if self.count else 0.0


def summarize(feature: Feature, values: Sequence[Any]) -> FeatureSummary:
    """Statistics of one column (nulls are None; NaN counts as null for numbers)."""
    present = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
    nulls = len(values) - len(present)
    if not present:
        return FeatureSummary(feature.name, len(values), nulls)
    if feature.type in NUMERIC_TYPES:
        return summarize_numbers(feature, np.asarray(present, dtype=np.float64), len(values))
    hashable = [v if isinstance(v, (str, bytes, bool, int, float)) else repr(v) for v in present]
    counter = Counter(hashable)
    top = [(str(v), n, n / len(present)) for v, n in counter.most_common(TOP_CATEGORIES)]
    categorical = CategoricalSummary(distinct_count=len(counter), top=top)
    # Ties go to the value seen first, so online and offline pick the same one.
    return FeatureSummary(feature.name, len(values), nulls, categorical=categorical, mode=counter.most_common(1)[0][0])


def summarize_numbers(feature: Feature, array: np.ndarray, count: int) -> FeatureSummary:
    """Statistics of a numeric feature's column from its non-null numbers (float64, no NaN) and its length
    with nulls: what `summarize` answers for the same column."""
    nulls = count - len(array)
    if not len(array):
        return FeatureSummary(feature.name, count, nulls)
    counts, bounds = np.histogram(array, bins=HISTOGRAM_BUCKETS)
    quantiles = np.quantile(array, PERCENTILES)
    uniques, frequency = np.unique(array, return_counts=True)
    mode: Any = float(uniques[int(np.argmax(frequency))])
    if feature.type in ("int64", "int32"):
        mode = int(mode)
    numeric = NumericSummary(
        mean=float(array.mean()),
        std=float(array.std()),
        min=float(array.min()),
        max=float(array.max()),
        percentiles={q: float(v) for q, v in zip(PERCENTILES, quantiles, strict=True)},
        bucket_bounds=[float(b) for b in bounds],
        bucket_counts=[int(c) for c in counts],
    )
    return FeatureSummary(feature.name, count, nulls, numeric=numeric, mode=mode)


def baselines(summaries: Mapping[str, FeatureSummary]) -> dict[str, Baseline]:
    """What imputation draws on, per feature."""
    result = {}
    for name, summary in summaries.items():
        numeric = summary.numeric
        result[name] = Baseline(
            mean=numeric.mean if numeric else None,
            median=numeric.percentiles.get(0.5) if numeric else None,
            most_frequent=summary.mode,
        )
    return result
