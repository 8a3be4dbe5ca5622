"""GPU utilisation and memory from NVML (nvidia-ml-py), read at each scrape. Exported only where NVML starts and
sees a GPU: a machine without one exports no GPU series at all, never zeros."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pynvml
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)
LABELS = ["gpu", "name"]


class GpuCollector(Collector):
    """One series per GPU: busy share of the last sample period (0..1), memory used and total."""

    def __init__(self, count: int) -> None:
        self.count = count

    def collect(self) -> Iterator[Metric]:
        utilization = GaugeMetricFamily(
            "fresco_gpu_utilization_ratio", "Share of the last NVML sample period the GPU ran a kernel.", labels=LABELS
        )
        used = GaugeMetricFamily("fresco_gpu_memory_used_bytes", "GPU memory in use.", labels=LABELS)
        total = GaugeMetricFamily("fresco_gpu_memory_total_bytes", "GPU memory installed.", labels=LABELS)
        for index in range(self.count):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                name = pynvml.nvmlDeviceGetName(handle)
                rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            except pynvml.NVMLError as err:  # a GPU that fell off the bus: its series go missing, not to zero
                log.warning("cannot read GPU %d from NVML: %s", index, err)
                continue
            labels = [str(index), name.decode() if isinstance(name, bytes) else str(name)]
            utilization.add_metric(labels, rates.gpu / 100.0)
            used.add_metric(labels, float(memory.used))
            total.add_metric(labels, float(memory.total))
        yield from (utilization, used, total)


def gpu_count() -> int:
    """GPUs NVML sees; 0 when there is no driver or no GPU."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        log.debug("no GPU metrics: NVML did not start: %s", err)
        return 0
    try:
        count = int(pynvml.nvmlDeviceGetCount())
    except pynvml.NVMLError as err:
        log.debug("no GPU metrics: NVML lists no devices: %s", err)
        count = 0
    if count == 0:
        pynvml.nvmlShutdown()
    return count


def register_gpu_metrics(registry: CollectorRegistry) -> GpuCollector | None:
    """Add the GPU collector to `registry` when this machine has a GPU; None (and nothing added) otherwise."""
    count = gpu_count()
    if count == 0:
        return None
    collector = GpuCollector(count)
    registry.register(collector)
    log.info("exporting utilisation and memory of %d GPUs", count)
    return collector
