"""Prediction quality of one version from its kept predictions and late labels, per window of prediction time.

Exact: counts and mean entropy are SQL aggregates over the window's predictions (each row's entropy is stored with
it); the other metrics are computed with numpy on every labelled row of the window, reusing the evaluation metrics of
the promotion gates. So the work per version and window is one indexed scan in the database plus, in the manager,
time and memory linear in its labelled predictions (bounded by the retention times the labelling rate) and a sort
for the AUC.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from fresco.api.models.v1 import monitoring_pb2 as mpb
from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager import metrics
from model_manager.metrics import Array
from model_manager.prediction_store import Summary, VersionRows

# Sliding windows by prediction time, shortest first; "all" is every prediction kept.
WINDOWS: tuple[tuple[str, float | None], ...] = (("5m", 300.0), ("1h", 3600.0), ("1d", 86400.0), ("all", None))
BINARY = rpb.MODEL_TASK_BINARY_CLASSIFICATION
REGRESSION = rpb.MODEL_TASK_REGRESSION
THRESHOLD = 0.5


def infer_task(declared: int, summary: Summary) -> int:
    """The declared task, else binary classification when every score lies in [0, 1] and every label is 0 or 1."""
    if declared != rpb.MODEL_TASK_UNSPECIFIED:
        return declared
    low, high = summary.min_score, summary.max_score
    scores_ok = low is None or high is None or (low >= 0 and high <= 1)
    return BINARY if scores_ok and summary.non_binary_labels == 0 else REGRESSION


def entropies(scores: Array) -> Array:
    """Binary predictive entropy in nats of each score read as a probability (clipped to [0, 1]):
    -(p ln p + (1-p) ln(1-p)), 0 at p = 0 or 1."""
    p = np.clip(scores, 0.0, 1.0)
    return -(_xlogx(p) + _xlogx(1.0 - p))


def _xlogx(x: Array) -> Array:
    safe = np.where(x > 0, x, 1.0)
    return np.where(x > 0, x * np.log(safe), 0.0)


def starts(now_us: int, names: Sequence[str]) -> list[int | None]:
    """Where each named window starts (None: "all", every prediction kept)."""
    lengths = dict(WINDOWS)
    return [None if lengths[n] is None else now_us - int(cast(float, lengths[n]) * 1e6) for n in names]


def judge_window(task: int, scores: Array, labels: Array) -> tuple[dict[str, float], rpb.Calibration | None]:
    """The metrics and (classifier) calibration of the labelled rows of one window; empty without labels.

    A classifier's scores are clipped to [0, 1] first: they are the positive class's probability."""
    if labels.size == 0:
        return {}, None
    if task == REGRESSION:
        return {"mae": metrics.mae(labels, scores), "rmse": metrics.rmse(labels, scores)}, None
    p = np.clip(scores, 0.0, 1.0)
    calibration = metrics.calibration(labels, p)
    found = {
        "accuracy": metrics.accuracy(labels, p, THRESHOLD),
        "logloss": metrics.logloss(labels, p),
        "brier": calibration.brier_score,
    }
    if 0 < int(labels.sum()) < labels.size:  # AUC needs both label values
        found["auc"] = metrics.auc(labels, p)
    return found, calibration


def quality(
    version: int, task: int, names: Sequence[str], summary: Summary, labelled: VersionRows, now_us: int
) -> mpb.VersionQuality:
    """A version's quality over the named windows ending now, from the aggregates of its predictions and its
    labelled rows (at least those of the widest window)."""
    answer = mpb.VersionQuality(version=version)
    earliest = now_us if summary.earliest_us is None else summary.earliest_us
    for name, start, (count, entropy_sum) in zip(names, starts(now_us, names), summary.windows, strict=True):
        inside = labelled.time_us >= (earliest if start is None else start)
        found, calibration = judge_window(task, labelled.score[inside], labelled.label[inside])
        window = mpb.QualityWindow(
            window=name,
            window_start=_stamp(min(earliest if start is None else start, now_us)),
            window_end=_stamp(now_us),
            task=task,  # type: ignore[arg-type]
            predictions=count,
            labelled=int(inside.sum()),
            metrics=found,
        )
        if calibration is not None:
            window.calibration.CopyFrom(calibration)
        if task == BINARY and count:
            window.mean_entropy = entropy_sum / count
        answer.windows.append(window)
    return answer


def _stamp(us: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMicroseconds(us)
    return stamp
