"""GPU gauges come from NVML and exist only where a GPU does: without one (this CI) nothing is exported, not zeros."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from predictor.gpu_metrics import gpu_count, register_gpu_metrics


def test_gpu_series_exist_exactly_when_nvml_sees_a_gpu() -> None:
    registry = CollectorRegistry()
    collector = register_gpu_metrics(registry)
    text = generate_latest(registry).decode()
    count = gpu_count()
    if count == 0:
        assert collector is None
        assert "fresco_gpu_" not in text
        return
    assert collector is not None  # on a GPU machine: one busy share in [0, 1] per GPU
    samples = [s for m in registry.collect() if m.name == "fresco_gpu_utilization_ratio" for s in m.samples]
    assert sorted(s.labels["gpu"] for s in samples) == [str(i) for i in range(count)]
    assert all(0.0 <= s.value <= 1.0 for s in samples)
