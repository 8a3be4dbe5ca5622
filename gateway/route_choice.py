"""Where one request goes, decided locally from one route table: a version the caller pinned wins;
else the sticky weighted split by (unit id, split seed), a random draw without a unit id; then the
replicas in rendezvous order, healthy ones first. Without a managed route, the static routes."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from gateway.routing import RouteTable as StaticRoutes
from model_manager.routes import MetricsConfig, ModelRoute, RouteTable, UnknownRoute, VersionRoute
from model_manager.split import rendezvous_order, split_version

_COOLDOWN_S: Final = 5.0


@dataclass(frozen=True)
class Target:
    """A model version to call and the endpoints to try, in order."""

    model: str  # the model the caller named
    version: str  # the version asked of the predictor; "" for its default (static routes)
    predictor_model: str  # the model name the endpoints serve it under
    endpoints: tuple[str, ...]  # empty for static routes: the pipeline picks one per group, round-robin
    revision: int = 0  # the route revision it was chosen under; 0 for static routes
    # Left out of equality and hashing: within one table, the fields above name the route already.
    route: ModelRoute | None = field(default=None, compare=False)
    metrics: MetricsConfig = field(default_factory=MetricsConfig, compare=False)

    @property
    def managed(self) -> bool:
        """Whether a model manager's route chose this target."""
        return self.route is not None


class EndpointHealth:
    """Endpoints that failed recently: tried after the healthy ones for a cool-down."""

    def __init__(self, cooldown_s: float = _COOLDOWN_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._failed_at: dict[str, float] = {}

    def healthy(self, address: str) -> bool:
        """Whether the endpoint has not failed within the cool-down."""
        failed = self._failed_at.get(address)
        return failed is None or self._clock() - failed >= self._cooldown_s

    def failed(self, address: str) -> None:
        """Note an endpoint that could not answer."""
        self._failed_at[address] = self._clock()

    def succeeded(self, address: str) -> None:
        """Note an endpoint that answered."""
        self._failed_at.pop(address, None)


class RouteChooser:
    """Chooses targets from the managed table when it routes the model, else from the static routes."""

    def __init__(
        self,
        static: StaticRoutes,
        managed: Callable[[], RouteTable | None] = lambda: None,
        health: EndpointHealth | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.static = static
        self.managed = managed
        self.health = health or EndpointHealth()
        self.rng = rng or random.Random()

    def table(self) -> RouteTable | None:
        """The managed table a request is served under, read once per request."""
        return self.managed()

    @staticmethod
    def routable(table: RouteTable | None, model: str, version: str) -> bool:
        """Whether the managed table routes `version` of `model` to an endpoint (weight 0 counts: an experiment
        arm or a pinned call may still go there)."""
        if table is None or not version:
            return False
        try:
            return bool(table.route(model).version(version).endpoints)
        except UnknownRoute:
            return False

    def target(self, table: RouteTable | None, model: str, version: str, unit_id: str) -> Target:
        """Where a request for `model` goes (`version` pinned by the caller, or "")."""
        if table is None:
            return Target(model, version, model, ())
        try:
            route = table.route(model)
            pinned = route.version(version) if version else None
        except UnknownRoute:  # a model or pinned version the table does not route: static routes, as before
            return Target(model, version, model, ())
        if pinned is not None:
            return self.version_target(table, route, pinned, unit_id)
        return self.version_target(table, route, split_version(route, unit_id or None, self.rng), unit_id)

    def version_target(self, table: RouteTable, route: ModelRoute, version: VersionRoute, unit_id: str) -> Target:
        """One version of a route, its endpoints in the key's rendezvous order, healthy ones first."""
        key = unit_id or f"{self.rng.getrandbits(64):016x}"
        ordered = [e.address for e in rendezvous_order(key, version.endpoints)]
        endpoints = [a for a in ordered if self.health.healthy(a)] + [a for a in ordered if not self.health.healthy(a)]
        return Target(
            route.model,
            version.version,
            version.predictor_model_name or route.model,
            tuple(endpoints),
            table.revision,
            route,
            table.metrics,
        )
