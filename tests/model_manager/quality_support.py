"""What the prediction quality tests share: metric windows carrying prediction records, label batches, and the offline
reference every figure is compared with (scikit-learn, and a numpy ECE and entropy written independently)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import numpy as np
import pytest
import scipy.stats
from google.protobuf.timestamp_pb2 import Timestamp
from sklearn import metrics as skm

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import monitoring_pb2 as mpb
from fresco.api.models.v1 import routing_pb2 as rtpb

TOLERANCE = 1e-9


def stamp(us: int) -> Timestamp:
    out = Timestamp()
    out.FromMicroseconds(us)
    return out


def window(
    model: str, version: int, records: Sequence[tuple[str, int, float]], end_us: int, *, shadow: bool = False
) -> rtpb.MetricsWindow:
    """A live (or shadow) window of no requests but these prediction records (request id, time, score)."""
    return rtpb.MetricsWindow(
        model_name=model,
        version=version,
        shadow=shadow,
        window_start=stamp(end_us - 10_000_000),
        window_end=stamp(end_us),
        window_id=f"w-{uuid.uuid4().hex}",
        prediction_records=[mpb.PredictionRecord(request_id=r, time=stamp(t), score=s) for r, t, s in records],
    )


def batch(pairs: Sequence[tuple[str, float]], model: str = "", batch_id: str = "") -> pb.LogLabelsRequest:
    return pb.LogLabelsRequest(
        labels=[mpb.Label(request_id=r, value=v) for r, v in pairs], model_name=model, batch_id=batch_id or "b"
    )


def reasons(response: pb.LogLabelsResponse) -> dict[int, str]:
    """The refused labels of a batch answer: index -> reason name without its prefix, lower case."""
    return {
        r.index: mpb.LabelRejection.Name(r.reason).removeprefix("LABEL_REJECTION_").lower() for r in response.rejected
    }


def offline_ece(labels: np.ndarray, scores: np.ndarray) -> float:
    """Expected calibration error over 10 equal-width bins [k/10, (k+1)/10), the last one closed."""
    edges = [k / 10 for k in range(1, 10)]
    bins = np.sum([scores >= e for e in edges], axis=0)
    gap = 0.0
    for b in range(10):
        inside = bins == b
        if inside.any():
            gap += inside.sum() * abs(scores[inside].mean() - labels[inside].mean())
    return float(gap / scores.size)


def check_binary(window: mpb.QualityWindow, labels: np.ndarray, scores: np.ndarray, every_score: np.ndarray) -> None:
    """A classifier's window against scikit-learn and the independent ECE and entropy, to 1e-9."""
    assert window.labelled == labels.size
    assert window.predictions == every_score.size
    got = dict(window.metrics)
    expected = {
        "accuracy": skm.accuracy_score(labels, (scores >= 0.5).astype(int)),
        "auc": skm.roc_auc_score(labels, scores),
        "logloss": skm.log_loss(labels, scores, labels=[0, 1]),
        "brier": skm.brier_score_loss(labels, scores),
    }
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=TOLERANCE, rel=0), name
    assert window.calibration.expected_calibration_error == pytest.approx(
        offline_ece(labels, scores), abs=TOLERANCE, rel=0
    )
    assert sum(b.count for b in window.calibration.bins) == labels.size
    entropy = scipy.stats.entropy(np.vstack([every_score, 1 - every_score])).mean()
    assert window.mean_entropy == pytest.approx(entropy, abs=TOLERANCE, rel=0)


def check_regression(window: mpb.QualityWindow, labels: np.ndarray, scores: np.ndarray) -> None:
    """A regression's window against scikit-learn, to 1e-9."""
    assert window.labelled == labels.size
    assert set(window.metrics) == {"mae", "rmse"}
    assert window.metrics["mae"] == pytest.approx(skm.mean_absolute_error(labels, scores), abs=TOLERANCE, rel=0)
    rmse = np.sqrt(skm.mean_squared_error(labels, scores))
    assert window.metrics["rmse"] == pytest.approx(rmse, abs=TOLERANCE, rel=0)
    assert not window.HasField("mean_entropy")
    assert not window.HasField("calibration")
