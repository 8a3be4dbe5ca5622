"""Online health of features in the service's Prometheus registry: how often values are served null,
imputed or missing, how often pushes are out of range, how the store tiers answer, degraded reads."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from chassis.metrics import LATENCY_BUCKETS

# FeatureStatus wire values → label values.
STATUS_LABELS = {1: "present", 2: "imputed", 3: "null", 4: "expired", 5: "not_found", 6: "rejected", 7: "unavailable"}


class ServedCounts(Collector):
    """fresco_feature_values_served: counted in a plain dict on the request path (one addition per column, no
    lock, no metric child) and rendered at scrape time, as a Counter of the same name and labels would be."""

    NAME = "fresco_feature_values_served"
    HELP = "Feature values served by GetFeatures, by view, feature and status (present, imputed, null, ...)."

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, int], int] = {}  # (view, feature, FeatureStatus wire value) → values

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.NAME, self.HELP, labels=["view", "feature", "status"])
        # A copy taken in one step: the event loop's thread adds to the dict while the scrape's thread renders.
        for (view, feature, status), count in list(self.counts.items()):
            family.add_metric([view, feature, STATUS_LABELS.get(status, "?")], count)
        yield family

    def describe(self) -> Iterable[Metric]:
        yield CounterMetricFamily(self.NAME, self.HELP, labels=["view", "feature", "status"])


class FeatureMetrics:
    """Feature-level counters and tier histograms; null rate is served{status!="present"} / served."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._tier_children: dict[str, tuple[Any, Any]] = {}
        self._tier_key_children: dict[tuple[str, str], Any] = {}
        self.values_served = ServedCounts()
        registry.register(self.values_served)
        self.values_pushed = Counter(
            "fresco_feature_values_pushed",
            "Non-null feature values received by PushFeatures, by view and feature.",
            ["view", "feature"],
            registry=registry,
        )
        self.values_out_of_range = Counter(
            "fresco_feature_values_out_of_range",
            "Pushed values outside their feature's range or category set, by view and feature.",
            ["view", "feature"],
            registry=registry,
        )
        self.rows = Counter(
            "fresco_feature_rows",
            "Rows received, by view, source (push, materialize) and outcome (accepted, rejected).",
            ["view", "source", "outcome"],
            registry=registry,
        )
        self.degraded_responses = Counter(
            "fresco_feature_degraded_responses",
            "GetFeatures answers served while a store tier was failing.",
            registry=registry,
        )
        self.tier_requests = Counter(
            "fresco_feature_tier_requests",
            "Store tier operations, by tier, operation and outcome (hit, miss, error, ok).",
            ["tier", "operation", "outcome"],
            registry=registry,
        )
        self.tier_keys = Counter(
            "fresco_feature_tier_keys",
            "Keys looked up in a store tier, by tier and result (hit, miss); hit rate is hit / (hit + miss).",
            ["tier", "result"],
            registry=registry,
        )
        self.tier_latency = Histogram(
            "fresco_feature_tier_latency_seconds",
            "Time of one store tier operation, by tier and operation.",
            ["tier", "operation"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def served(self, view: str, feature: str, statuses: Sequence[int]) -> None:
        """Count one column's statuses."""
        counts = self.values_served.counts
        if statuses and statuses.count(statuses[0]) == len(statuses):  # one status (all present, usually)
            key = (view, feature, statuses[0])
            counts[key] = counts.get(key, 0) + len(statuses)
            return
        for status, count in Tally(statuses).items():
            key = (view, feature, status)
            counts[key] = counts.get(key, 0) + count

    def observe_tier(self, tier: str, hits: int, misses: int, seconds: float) -> None:
        """The store's observer hook: one tier consulted for a read, how many keys it held, how long it took."""
        children = self._tier_children.get(tier)
        if children is None:  # bound once per tier: label lookups cost more than the updates
            children = self._tier_children[tier] = (
                self.tier_latency.labels(tier, "read"),
                self.tier_requests.labels(tier, "read", "ok"),
            )
        latency, requests = children
        latency.observe(seconds)
        requests.inc()
        # A result's series appears with its first key (a tier that never hit has no hit series), as before.
        if hits:
            self._tier_keys(tier, "hit").inc(hits)
        if misses:
            self._tier_keys(tier, "miss").inc(misses)

    def _tier_keys(self, tier: str, result: str) -> Any:
        child = self._tier_key_children.get((tier, result))
        if child is None:
            child = self._tier_key_children[(tier, result)] = self.tier_keys.labels(tier, result)
        return child

    def read_failures(self, tiers: Iterable[str]) -> None:
        """Tiers that failed during one read, and the degraded answer that made."""
        failed = False
        for tier in tiers:
            self.tier_requests.labels(tier, "read", "error").inc()
            failed = True
        if failed:
            self.degraded_responses.inc()
