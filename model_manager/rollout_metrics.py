"""Rollouts and routes on the model manager's /metrics, read at each scrape: each model's latest rollout (state,
phase, versions) and the share of live traffic the published route table gives each version."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from model_manager.actions import State
from model_manager.controller import RolloutController
from model_manager.route_hub import RouteHub

STATES = tuple(state.value for state in State)


class RolloutCollector(Collector):
    """Reads the controller's rollouts and the hub's route table; both are replaced, not mutated, by the loop."""

    def __init__(self, controller: RolloutController, hub: RouteHub) -> None:
        self.controller = controller
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "fresco_rollout_state", "1 for the state of the model's latest rollout, 0 for the others.",
            labels=["model", "state"],
        )  # fmt: skip
        phase = GaugeMetricFamily(
            "fresco_rollout_phase", "Phase of the model's latest rollout (0 first), with its strategy.",
            labels=["model", "strategy"],
        )  # fmt: skip
        version = GaugeMetricFamily(
            "fresco_rollout_version", "Versions of the latest rollout: deployed (target), replaced (baseline).",
            labels=["model", "role"],
        )  # fmt: skip
        latest = dict(self.controller.latest)  # a copy: the event loop may add a model meanwhile
        for model, rollout_id in sorted(latest.items()):
            entry = self.controller.entries.get(rollout_id)
            if entry is None:
                continue
            rollout = entry.rollout
            for name in STATES:
                state.add_metric([model, name], 1.0 if rollout.state.value == name else 0.0)
            phase.add_metric([model, rollout.spec.strategy.value], float(rollout.phase))
            version.add_metric([model, "target"], float(rollout.spec.version))
            if rollout.spec.baseline is not None:
                version.add_metric([model, "baseline"], float(rollout.spec.baseline))
        yield from (state, phase, version)
        yield from self._routes()

    def _routes(self) -> Iterator[Metric]:
        share = GaugeMetricFamily(
            "fresco_route_traffic_share", "Share of the model's live traffic routed to the version (0..1).",
            labels=["model", "version"],
        )  # fmt: skip
        shadow = GaugeMetricFamily(
            "fresco_route_shadow_share", "Share of the model's traffic mirrored to its shadow version (0..1).",
            labels=["model", "version"],
        )  # fmt: skip
        table = self.hub.table
        for route in table.routes:
            total = sum(v.weight for v in route.versions)
            for v in route.versions:
                share.add_metric([route.model, v.version], v.weight / total if total else 0.0)
            if route.shadow is not None:
                shadow.add_metric([route.model, route.shadow.version], route.shadow.share)
        revision = GaugeMetricFamily("fresco_route_table_revision", "Revision of the route table published.")
        revision.add_metric([], float(table.revision))
        yield from (share, shadow, revision)


def register_rollout_metrics(registry: CollectorRegistry, controller: RolloutController, hub: RouteHub) -> None:
    """Export the rollouts and routes of `controller` and `hub` on `registry`."""
    registry.register(RolloutCollector(controller, hub))
