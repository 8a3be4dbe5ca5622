"""Training statistics as a version registers them: the same counting as the serving sketches (so nulls, text and
infinities are classified alike), exact moments and percentiles, a decile histogram with inclusive upper bounds, the
KLL sketch that drift's KS and PSI bins are taken from, and every category for categorical features."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np

from fresco.api.features.v1 import statistics_pb2
from fresco.monitoring.drift import DECILES
from fresco.monitoring.sketches import ColumnSketch

PERCENTILES: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
MAX_TRAINING_CATEGORIES: Final = 1000  # beyond it only the most frequent are listed and unseen ones go uncounted


def _finite(values: Sequence[object] | np.ndarray) -> np.ndarray:
    """The finite numbers among `values` (list elements included), booleans and text left out."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "fiu":
        flat = values.astype(np.float64, copy=False).ravel()
        return flat[np.isfinite(flat)]
    numbers: list[float] = []
    stack = list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, list | tuple | np.ndarray):
            stack.extend(value)
        elif isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool):
            numbers.append(float(value))
    array = np.asarray(numbers, dtype=np.float64)
    return array[np.isfinite(array)]


def numeric_statistics(numbers: np.ndarray, sketch: ColumnSketch) -> statistics_pb2.NumericStatistics:
    """Moments, percentiles, the decile histogram and the KLL sketch of finite numbers."""
    bounds = np.unique(np.quantile(numbers, DECILES))
    counts = np.bincount(np.searchsorted(bounds, numbers, side="left"), minlength=bounds.size + 1)
    return statistics_pb2.NumericStatistics(
        mean=float(numbers.mean()),
        stddev=float(numbers.std()),
        min=float(numbers.min()),
        max=float(numbers.max()),
        percentiles=[
            statistics_pb2.Percentile(quantile=q, value=float(v))
            for q, v in zip(PERCENTILES, np.quantile(numbers, PERCENTILES), strict=True)
        ],
        histogram=statistics_pb2.Histogram(bucket_bounds=bounds.tolist(), bucket_counts=counts.tolist()),
        kll_sketch=sketch.kll.serialize(),
    )


def feature_statistics(name: str, values: Sequence[object] | np.ndarray) -> statistics_pb2.FeatureStatistics:
    """Statistics of one feature's (or output's) training values: numeric when they are numbers, categorical when
    they are text or booleans (whichever holds more values)."""
    sketch = ColumnSketch(name)
    sketch.add(values)
    stats = statistics_pb2.FeatureStatistics(
        feature_name=name,
        count=sketch.count,
        null_count=sketch.null_count,
        null_rate=sketch.null_count / sketch.count if sketch.count else 0.0,
    )
    if sketch.numeric_count() and sketch.numeric_count() >= sketch.categorical_count():
        stats.numeric.CopyFrom(numeric_statistics(_finite(values), sketch))
    elif sketch.categorical_count():
        total = sketch.categorical_count()
        listed = sketch.categories.most_common(MAX_TRAINING_CATEGORIES)
        stats.categorical.CopyFrom(
            statistics_pb2.CategoricalStatistics(
                distinct_count=len(sketch.categories),
                top_categories=[
                    statistics_pb2.CategoryCount(value=value, count=n, fraction=n / total) for value, n in listed
                ],
            )
        )
    return stats
