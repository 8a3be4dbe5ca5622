"""Evaluation metrics of scores against labels: AUC, accuracy, log-loss, RMSE, MAE and calibration."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fresco.api.models.v1 import registry_pb2 as rpb

# The metrics a threshold may name; higher is better for the first two, lower for the rest.
METRICS = ("auc", "accuracy", "logloss", "rmse", "mae", "calibration_error", "brier")
HIGHER_IS_BETTER = frozenset({"auc", "accuracy"})
CALIBRATION_BINS = 10
# Log-loss of a confident wrong answer is capped instead of infinite.
EPSILON = 1e-15

Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Evaluation:
    """The metrics of one set of rows, and the calibration when the scores are probabilities of binary labels."""

    rows: int
    metrics: dict[str, float]
    calibration: rpb.Calibration | None
    # Why a metric is missing, e.g. {"auc": "needs both label values"}.
    missing: dict[str, str]


def auc(labels: Array, scores: Array) -> float:
    """ROC AUC as the Mann-Whitney statistic, ties counted half; labels are 0/1 and both must occur."""
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError("AUC needs both label values")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average_ranks = (ends - counts + 1 + ends) / 2.0  # tied scores share the mean of their ranks
    ranks = average_ranks[inverse]
    rank_sum = float(ranks[labels == 1].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def accuracy(labels: Array, scores: Array, threshold: float = 0.5) -> float:
    """Share of rows whose score, cut at `threshold`, gives the label."""
    return float(np.mean((scores >= threshold).astype(np.float64) == labels))


def logloss(labels: Array, scores: Array) -> float:
    """Mean negative log-likelihood of binary labels under the predicted probabilities."""
    p = np.clip(scores, EPSILON, 1 - EPSILON)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def rmse(labels: Array, scores: Array) -> float:
    """Root mean squared error."""
    return float(np.sqrt(np.mean((scores - labels) ** 2)))


def mae(labels: Array, scores: Array) -> float:
    """Mean absolute error."""
    return float(np.mean(np.abs(scores - labels)))


def calibration(labels: Array, scores: Array, bins: int = CALIBRATION_BINS) -> rpb.Calibration:
    """Reliability bins of equal width over [0, 1], the count-weighted mean gap (ECE) and the Brier score."""
    index = np.minimum((scores * bins).astype(np.int64), bins - 1)
    result = rpb.Calibration(brier_score=float(np.mean((scores - labels) ** 2)))
    gap = 0.0
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        if count == 0:
            continue
        predicted, observed = scores[members], labels[members]
        mean_predicted, observed_rate = float(predicted.mean()), float(observed.mean())
        gap += count * abs(mean_predicted - observed_rate)
        result.bins.append(
            rpb.CalibrationBin(
                lower=float(predicted.min()),
                upper=float(predicted.max()),
                mean_predicted=mean_predicted,
                observed_rate=observed_rate,
                count=count,
            )
        )
    result.expected_calibration_error = gap / scores.size
    return result


def evaluate(labels: Array, scores: Array) -> Evaluation:
    """Every metric that applies: regression errors always; AUC for 0/1 labels; accuracy, log-loss and
    calibration when the scores are also probabilities in [0, 1]."""
    if labels.size == 0:
        raise ValueError("no rows to evaluate")
    metrics = {"rmse": rmse(labels, scores), "mae": mae(labels, scores)}
    missing: dict[str, str] = {}
    calibrated: rpb.Calibration | None = None
    binary = bool(np.all((labels == 0) | (labels == 1)))
    probabilities = bool(np.all((scores >= 0) & (scores <= 1)))
    if not binary:
        for name in ("auc", "accuracy", "logloss", "calibration_error", "brier"):
            missing[name] = "needs 0/1 labels"
        return Evaluation(labels.size, metrics, None, missing)
    try:
        metrics["auc"] = auc(labels, scores)
    except ValueError as err:
        missing["auc"] = str(err)
    if probabilities:
        metrics["accuracy"] = accuracy(labels, scores)
        metrics["logloss"] = logloss(labels, scores)
        calibrated = calibration(labels, scores)
        metrics["calibration_error"] = calibrated.expected_calibration_error
        metrics["brier"] = calibrated.brier_score
    else:
        for name in ("accuracy", "logloss", "calibration_error", "brier"):
            missing[name] = "needs scores that are probabilities in [0, 1]"
    return Evaluation(labels.size, metrics, calibrated, missing)
