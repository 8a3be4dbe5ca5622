"""Exposures on the experiment service's /metrics: rows received per experiment and arm, and what became of them."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter

from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_service_pb2 as spb

OUTCOMES = ("accepted", "duplicate", "rejected")


class ExposureMetrics:
    """Counters LogExposures updates after each batch."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.received = Counter(
            "fresco_experiment_exposures_received",
            "Exposure rows LogExposures received, by experiment and arm (duplicates and rejected rows included).",
            ["experiment", "arm"],
            registry=registry,
        )
        self.outcomes = Counter(
            "fresco_experiment_exposures",
            "Exposure rows by outcome: accepted (recorded now), duplicate (recorded before), rejected.",
            ["outcome"],
            registry=registry,
        )
        for outcome in OUTCOMES:
            self.outcomes.labels(outcome)  # all exported from the start, at 0

    def observe(self, rows: Sequence[apb.Exposure], answer: spb.LogExposuresResponse) -> None:
        """Count one answered batch."""
        for (experiment, arm), count in Tally((row.experiment_key, row.arm_name) for row in rows).items():
            self.received.labels(experiment, arm).inc(count)
        self.outcomes.labels("accepted").inc(answer.accepted)
        self.outcomes.labels("duplicate").inc(answer.duplicates)
        self.outcomes.labels("rejected").inc(len(answer.rejections))
