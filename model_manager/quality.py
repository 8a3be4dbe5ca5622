"""Prediction quality of one version from its kept predictions and late labels, per window of prediction time.

Exact: every metric is computed on all the window's rows (numpy), reusing the evaluation metrics of the promotion
gates. The work per version is linear in its kept predictions (bounded by the retention times the gateways' record
rate), plus a sort for the AUC.
"""

from __future__ import annotations

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from fresco.api.models.v1 import monitoring_pb2 as mpb
from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager import metrics
from model_manager.metrics import Array
from model_manager.prediction_store import VersionRows

# Sliding windows by prediction time, shortest first; "all" is every prediction kept.
WINDOWS: tuple[tuple[str, float | None], ...] = (("5m", 300.0), ("1h", 3600.0), ("1d", 86400.0), ("all", None))
BINARY = rpb.MODEL_TASK_BINARY_CLASSIFICATION
REGRESSION = rpb.MODEL_TASK_REGRESSION
THRESHOLD = 0.5


def infer_task(declared: int, rows: VersionRows) -> int:
    """The declared task, else binary classification when every score lies in [0, 1] and every label is 0 or 1."""
    if declared != rpb.MODEL_TASK_UNSPECIFIED:
        return declared
    labels = rows.label[~np.isnan(rows.label)]
    scores_ok = bool(np.all((rows.score >= 0) & (rows.score <= 1)))
    labels_ok = bool(np.all((labels == 0) | (labels == 1)))
    return BINARY if scores_ok and labels_ok else REGRESSION


def mean_entropy(probabilities: Array) -> float:
    """Mean binary predictive entropy in nats: -(p ln p + (1-p) ln(1-p)), 0 at p = 0 or 1."""
    p = np.clip(probabilities, 0.0, 1.0)
    return float(np.mean(_xlogx(p) + _xlogx(1.0 - p)) * -1.0)


def _xlogx(x: Array) -> Array:
    safe = np.where(x > 0, x, 1.0)
    return np.where(x > 0, x * np.log(safe), 0.0)


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


def quality(version: int, task: int, rows: VersionRows, now_us: int) -> mpb.VersionQuality:
    """A version's quality over each window ending now, shortest first."""
    answer = mpb.VersionQuality(version=version)
    labelled = ~np.isnan(rows.label)
    earliest = int(rows.time_us.min()) if rows.time_us.size else now_us
    for name, length in WINDOWS:
        start_us = earliest if length is None else now_us - int(length * 1e6)
        inside = rows.time_us >= start_us if length is not None else np.ones(rows.time_us.size, dtype=bool)
        judged = inside & labelled
        found, calibration = judge_window(task, rows.score[judged], rows.label[judged])
        window = mpb.QualityWindow(
            window=name,
            window_start=_stamp(min(start_us, now_us)),
            window_end=_stamp(now_us),
            task=task,  # type: ignore[arg-type]
            predictions=int(inside.sum()),
            labelled=int(judged.sum()),
            metrics=found,
        )
        if calibration is not None:
            window.calibration.CopyFrom(calibration)
        if task == BINARY and inside.any():
            window.mean_entropy = mean_entropy(rows.score[inside])
        answer.windows.append(window)
    return answer


def _stamp(us: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMicroseconds(us)
    return stamp
