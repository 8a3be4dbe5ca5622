"""Experiments on the request path: each query without a pinned version is assigned locally from the
configuration in use (bandit arms settled by the sticky store), routed to its arm's model version when
the model's route can serve it, and, once that version answered (not a fallback, not the static
answer), its exposure is logged. An arm whose version cannot be routed is served by the model's normal
route and is not exposed."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from prometheus_client import CollectorRegistry, Counter

from fresco.api.common.v1 import values_pb2
from fresco.experiments.evaluator import Assigned, Evaluator, StickyArms
from gateway.exposures import ExposureLog
from gateway.offload import Offload
from gateway.route_choice import RouteChooser
from model_manager.routes import RouteTable

log = logging.getLogger(__name__)
# Assigning one unit in one experiment (three hashes, targeting) costs about as much as handling this many bytes.
_WEIGHT_PER_ASSIGNMENT: Final = 256


class Assignable(Protocol):
    """What assigning needs of a query."""

    @property
    def model(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def unit_ids(self) -> Mapping[str, str]: ...
    @property
    def attributes(self) -> Mapping[str, values_pb2.Value]: ...


@dataclass(frozen=True)
class ArmResult:
    """One experiment's arm for a query, and whether its version answered (an exposure)."""

    assigned: Assigned
    exposed: bool


def _hash(evaluator: Evaluator, queries: Sequence[Assignable]) -> list[list[Assigned]]:
    return [
        [] if q.version else [a for a in evaluator.assign(q.unit_ids, q.attributes, q.model) if a.assigned]
        for q in queries
    ]


class ExperimentArms:
    """Assignment, arm routing and exposure for the prediction pipeline."""

    def __init__(
        self,
        evaluator: Callable[[], Evaluator | None],
        registry: CollectorRegistry,
        sticky: StickyArms | None = None,
        exposures: ExposureLog | None = None,
    ) -> None:
        self.evaluator = evaluator
        self.sticky = sticky
        self.exposures = exposures
        self.unsettled = Counter(
            "fresco_gateway_experiment_unsettled",
            "Bandit assignments left out of a request because the sticky store could not be reached.",
            registry=registry,
        )
        self.unroutable = Counter(
            "fresco_gateway_experiment_unroutable",
            "Assigned arms whose model version the route could not serve: the normal route answered, no exposure.",
            ["experiment"],
            registry=registry,
        )

    async def assign(self, queries: Sequence[Assignable], offload: Offload | None = None) -> list[list[Assigned]]:
        """Each query's arms (the experiments it is in, by key), from one configuration for the whole request;
        none for a query that pins a version. A large request hashes in `offload`'s worker."""
        evaluator = self.evaluator()  # read once: a configuration published meanwhile applies to the next request
        if evaluator is None or not len(evaluator):
            return [[] for _ in queries]
        weight = _WEIGHT_PER_ASSIGNMENT * len(queries) * len(evaluator)
        arms = await offload.run(weight, _hash, evaluator, queries) if offload else _hash(evaluator, queries)
        if any(a.sticky for query_arms in arms for a in query_arms):
            arms = await self._settle(evaluator, arms)
        return arms

    async def _settle(self, evaluator: Evaluator, arms: list[list[Assigned]]) -> list[list[Assigned]]:
        """Bandit arms replaced by each unit's first stored arm: one store call per experiment for the request."""
        if self.sticky is None:  # no store: the arm is the hash's under the current weights
            return arms
        flat = [a for query_arms in arms for a in query_arms]
        try:
            settled = iter(await evaluator.settle(flat, self.sticky))
        except Exception as err:  # noqa: BLE001 (the store is down: the request is served, outside the bandits)
            dropped = sum(a.sticky for a in flat)
            log.warning("sticky arm store failed (%s): %d bandit assignments left out", err, dropped)
            self.unsettled.inc(dropped)
            return [[a for a in query_arms if not a.sticky] for query_arms in arms]
        return [[next(settled) for _ in query_arms] for query_arms in arms]

    def routed_version(self, table: RouteTable | None, model: str, arms: Sequence[Assigned]) -> str:
        """The model version the query's arms route it to: the first arm with a version (by experiment key);
        "" when no arm names one or the route cannot serve it."""
        for assigned in arms:
            if assigned.model_version:
                version = str(assigned.model_version)
                return version if RouteChooser.routable(table, model, version) else ""
        return ""

    def results(self, arms: Sequence[Assigned], routed: str, answered_version: str, fallback: bool) -> list[ArmResult]:
        """The query's arms, each exposed when its version answered (any answer of the model, for an arm of
        parameters only), the exposure offered to the log."""
        answered = bool(answered_version) and not fallback  # "" is the static answer
        out = []
        now = time.time_ns()
        for assigned in arms:
            own = str(assigned.model_version) if assigned.model_version else ""
            if own and not routed:
                self.unroutable.labels(assigned.experiment_key).inc()
            exposed = answered and (not own or own == routed == answered_version)
            if exposed and self.exposures is not None:
                self.exposures.offer(assigned, now)
            out.append(ArmResult(assigned, exposed))
        return out
