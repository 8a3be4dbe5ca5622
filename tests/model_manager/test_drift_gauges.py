"""The drift gauges: one child per model, version, name and window, set by the refresher off the request path;
a version silent for a day loses its children; the first pass merges windows stored but never merged."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from model_manager.drift_gauges import DriftGauges, DriftRefresher
from model_manager.monitor_store import BUCKET_S, DAY_S, MonitorStore
from model_manager.monitors import ModelMonitors
from model_manager.registry import Registry
from tests.model_manager.monitor_support import SCORE, register, scores, sketch, sketches_of, traffic, window

T0 = 1_790_000_000.0 - (1_790_000_000.0 % BUCKET_S)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_gauges_follow_the_store_and_forget_a_version_silent_for_a_day(tmp_path: Path) -> None:
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    try:
        model = register(registry)
        clock = Clock(T0 + 100)
        store = MonitorStore(registry.engine, clock)
        monitors = ModelMonitors(registry, store)
        metrics = CollectorRegistry()
        columns = traffic(7, 1500, {"users:age": 1.0})
        stored = window(model, 1, [*sketches_of(columns), sketch("probability", scores(7, 1500), SCORE)], start=T0)
        refresher = DriftRefresher(monitors.drift, DriftGauges(metrics), monitors.basis_or_none, 5.0, backlog=[stored])

        assert refresher.refresh() == 1, "the backlog is merged before the first pass"
        age = {"model": model, "version": "1", "feature": "users:age", "kind": "feature", "window": "5m"}
        spend = {**age, "feature": "users:spend"}
        score = {**age, "feature": "probability", "kind": "score"}
        assert metrics.get_sample_value("fresco_feature_drift_breached", age) == 1.0
        assert metrics.get_sample_value("fresco_feature_drift_breached", spend) == 0.0
        assert metrics.get_sample_value("fresco_feature_drift_values", score) == 1500.0
        ks = metrics.get_sample_value("fresco_feature_drift_ks", age)
        assert ks is not None
        assert ks > 0.1

        clock.now += 600  # ten minutes on: the 5m window is empty, the day still holds the values
        assert refresher.refresh() == 1
        assert metrics.get_sample_value("fresco_feature_drift_values", age) == 0.0
        assert metrics.get_sample_value("fresco_feature_drift_values", {**age, "window": "1d"}) == 1500.0

        clock.now += DAY_S
        assert refresher.refresh() == 0
        assert metrics.get_sample_value("fresco_feature_drift_values", {**age, "window": "1d"}) is None
        assert metrics.get_sample_value("fresco_feature_drift_psi", score) is None
    finally:
        registry.close()
