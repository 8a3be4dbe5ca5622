"""Prometheus series of prediction quality: gauges per model, version and window, set by the periodic refresh (never on
a request), and the count of labels received by outcome."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge

from fresco.api.models.v1 import monitoring_pb2 as mpb

LABELS = ["model", "version", "window"]
WINDOWS = frozenset({"5m", "1h", "1d"})
# Gauge name suffix -> the QualityWindow metric it shows.
FROM_METRICS = {"accuracy": "accuracy", "auc": "auc", "logloss": "logloss", "mae": "mae"}


class QualityMetrics:
    """The quality gauges and the labels counter, in one service's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, text: str) -> Gauge:
            return Gauge(f"fresco_model_{name}", text, LABELS, registry=registry)

        self.gauges = {
            "accuracy": gauge("accuracy", "Share of labelled predictions right at threshold 0.5 (binary classifiers)."),
            "auc": gauge("auc", "ROC AUC of labelled predictions (binary classifiers with both labels)."),
            "logloss": gauge("logloss", "Log-loss of labelled predictions (binary classifiers)."),
            "mae": gauge("mae", "Mean absolute error of labelled predictions (regression)."),
            "calibration_error": gauge("calibration_error", "Expected calibration error over 10 reliability bins."),
            "mean_entropy": gauge("mean_entropy", "Mean predictive entropy in nats, labelled or not (classifiers)."),
            "labelled_predictions": gauge("labelled_predictions", "Predictions of the window with a label."),
        }
        self.labels = Counter(
            "fresco_labels_received",
            "Late labels received, by outcome: accepted, or the reason they were refused.",
            ["outcome"],
            registry=registry,
        )
        self._shown: dict[str, set[tuple[str, str, str]]] = {name: set() for name in self.gauges}

    def received(self, outcome: str, count: int) -> None:
        """Count labels received with one outcome."""
        if count:
            self.labels.labels(outcome).inc(count)

    def publish(self, qualities: Mapping[tuple[str, int], mpb.VersionQuality]) -> None:
        """Show these versions' windows; series of versions or metrics no longer measured are removed."""
        values: dict[str, dict[tuple[str, str, str], float]] = {name: {} for name in self.gauges}
        for (model, _), answer in qualities.items():
            for window in answer.windows:
                if window.window not in WINDOWS:
                    continue
                key = (model, str(answer.version), window.window)
                values["labelled_predictions"][key] = float(window.labelled)
                for shown, metric in FROM_METRICS.items():
                    if metric in window.metrics:
                        values[shown][key] = window.metrics[metric]
                if window.HasField("calibration"):
                    values["calibration_error"][key] = window.calibration.expected_calibration_error
                if window.HasField("mean_entropy"):
                    values["mean_entropy"][key] = window.mean_entropy
        for name, gauge in self.gauges.items():
            for key, value in values[name].items():
                gauge.labels(*key).set(value)
            for key in self._shown[name] - values[name].keys():
                gauge.remove(*key)
            self._shown[name] = set(values[name])
