"""The demo registers each version with the training histogram of its score over fixed bins."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fresco.story import SCORE_BOUNDS, SCORE_OUTPUT, score_statistics
from fresco.training import train_classifier, write_failing_model


def test_each_version_gets_a_score_histogram_over_the_shared_bins(tmp_path: Path) -> None:
    v1 = train_classifier(tmp_path, "demo", 1, max_iter=50)
    stats = score_statistics(v1.path, v1.sample)
    assert stats.feature_name == SCORE_OUTPUT
    hist = stats.numeric.histogram
    assert tuple(hist.bucket_bounds) == SCORE_BOUNDS
    assert sum(hist.bucket_counts) == stats.count == len(v1.sample)
    assert 0.0 < stats.numeric.mean < 1.0
    assert max(hist.bucket_counts) < len(v1.sample), "the scores spread over more than one bin"

    # The broken v3 fails on rows with |x0| >= 0.5: only the rows it scores are counted.
    v3 = write_failing_model(v1, tmp_path, 3)
    broken = score_statistics(v3.path, v3.sample)
    scored = int(np.sum(np.abs(v1.sample[:, 0]) < 0.5))
    assert broken.count == sum(broken.numeric.histogram.bucket_counts) == scored


def test_the_score_statistics_carry_the_range_drift_judges_served_scores_by(tmp_path: Path) -> None:
    from fresco.api.models.v1 import monitoring_pb2 as mpb
    from fresco.monitoring.drift import DEFAULT_LIMITS, measure
    from fresco.monitoring.sketches import SCORE, ColumnSketch

    v1 = train_classifier(tmp_path, "demo", 1, max_iter=50)
    stats = score_statistics(v1.path, v1.sample)
    assert 0.0 <= stats.numeric.min < stats.numeric.max <= 1.0
    # The very scores training saw, served again.
    message = mpb.ValueSketch(name=SCORE_OUTPUT, kind=SCORE, count=stats.count, kll_sketch=stats.numeric.kll_sketch)
    served = ColumnSketch.from_proto(message)
    drift = measure(served, stats, DEFAULT_LIMITS, min_rows=10)
    assert drift.out_of_range == 0.0, "the same scores served are within training's range"
    assert not drift.breached
