"""The quality gauges: each window's figures under {model, version, window}, series of versions no longer measured
removed, "all" never shown, and labels counted by outcome."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from fresco.api.models.v1 import monitoring_pb2 as mpb
from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager.quality_metrics import QualityMetrics


def classifier(version: int, accuracy: float) -> mpb.VersionQuality:
    answer = mpb.VersionQuality(version=version)
    for name in ("1h", "all"):
        window = answer.windows.add(window=name, labelled=40, predictions=50, metrics={"accuracy": accuracy})
        window.calibration.CopyFrom(rpb.Calibration(expected_calibration_error=0.05))
        window.mean_entropy = 0.6
    return answer


def test_gauges_follow_the_versions_measured_and_labels_are_counted() -> None:
    registry = CollectorRegistry()
    metrics = QualityMetrics(registry)
    metrics.publish({("churn", 1): classifier(1, 0.9), ("churn", 2): classifier(2, 0.8)})

    def value(name: str, version: str, window: str = "1h") -> float | None:
        labels = {"model": "churn", "version": version, "window": window}
        return registry.get_sample_value(name, labels)

    assert value("fresco_model_accuracy", "1") == 0.9
    assert value("fresco_model_accuracy", "2") == 0.8
    assert value("fresco_model_calibration_error", "2") == 0.05
    assert value("fresco_model_mean_entropy", "1") == 0.6
    assert value("fresco_model_labelled_predictions", "1") == 40
    assert value("fresco_model_accuracy", "1", "all") is None
    assert value("fresco_model_auc", "1") is None  # not measured: no series
    metrics.publish({("churn", 2): classifier(2, 0.7)})
    assert value("fresco_model_accuracy", "1") is None
    assert value("fresco_model_labelled_predictions", "1") is None
    assert value("fresco_model_accuracy", "2") == 0.7
    metrics.received("accepted", 3)
    metrics.received("unknown_request", 1)
    metrics.received("invalid_value", 0)
    assert registry.get_sample_value("fresco_labels_received_total", {"outcome": "accepted"}) == 3
    assert registry.get_sample_value("fresco_labels_received_total", {"outcome": "unknown_request"}) == 1
