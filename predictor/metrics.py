"""Prometheus metrics per model and version. Label children are bound once per version, so the
request path pays for no label lookups."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from chassis.metrics import LATENCY_BUCKETS

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class PredictorMetrics:
    """The predictor's metric families, registered in its service's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["model", "version"]
        self.requests = Counter(
            "fresco_model_requests", "Inference requests, by outcome.", [*labels, "outcome"], registry=registry
        )
        self.inferences = Counter(
            "fresco_model_inferences", "Rows inferred (batch elements).", labels, registry=registry
        )
        self.executions = Counter(
            "fresco_model_executions", "Model executions (batches run).", labels, registry=registry
        )
        self.request_seconds = Histogram(
            "fresco_model_request_seconds", "Request time in the predictor.", labels, buckets=LATENCY_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.queue_seconds = Histogram(
            "fresco_model_queue_seconds", "Time requests wait in the batcher.", labels, buckets=LATENCY_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.compute_seconds = Histogram(
            "fresco_model_compute_seconds", "Time one execution takes.", labels, buckets=LATENCY_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.batch_size = Histogram(
            "fresco_model_batch_size", "Rows per execution.", labels, buckets=BATCH_BUCKETS, registry=registry
        )
        self.loaded = Gauge("fresco_model_loaded", "1 while the version is READY.", labels, registry=registry)
        self.memory_bytes = Gauge(
            "fresco_model_memory_bytes", "Memory the version's session holds.", labels, registry=registry
        )
        self.load_seconds = Gauge("fresco_model_load_seconds", "Time the last load took.", labels, registry=registry)
        self.warm_p99_seconds = Gauge(
            "fresco_model_warm_p99_seconds", "p99 latency of the warm-up runs.", labels, registry=registry
        )

    def forget(self, model: str, version: str) -> None:
        """Drop one version's series: a model that never served (e.g. files sent under a new name
        that failed to load) must leave no label values behind."""
        for family in (self.inferences, self.executions, self.request_seconds, self.queue_seconds,
                       self.compute_seconds, self.batch_size, self.loaded, self.memory_bytes, self.load_seconds,
                       self.warm_p99_seconds):  # fmt: skip
            with contextlib.suppress(KeyError):
                family.remove(model, version)
        for outcome in ("success", "failure"):
            with contextlib.suppress(KeyError):
                self.requests.remove(model, version, outcome)

    def bind(self, model: str, version: str) -> VersionMetrics:
        """Children bound to one version."""
        return VersionMetrics(
            success=self.requests.labels(model, version, "success"),
            failure=self.requests.labels(model, version, "failure"),
            inferences=self.inferences.labels(model, version),
            executions=self.executions.labels(model, version),
            request_seconds=self.request_seconds.labels(model, version),
            queue_seconds=self.queue_seconds.labels(model, version),
            compute_seconds=self.compute_seconds.labels(model, version),
            batch_size=self.batch_size.labels(model, version),
            loaded=self.loaded.labels(model, version),
            memory_bytes=self.memory_bytes.labels(model, version),
            load_seconds=self.load_seconds.labels(model, version),
            warm_p99_seconds=self.warm_p99_seconds.labels(model, version),
        )


@dataclass(frozen=True)
class VersionMetrics:
    """One version's bound metric children."""

    success: Counter
    failure: Counter
    inferences: Counter
    executions: Counter
    request_seconds: Histogram
    queue_seconds: Histogram
    compute_seconds: Histogram
    batch_size: Histogram
    loaded: Gauge
    memory_bytes: Gauge
    load_seconds: Gauge
    warm_p99_seconds: Gauge
