"""What the servicer's RPC mixins run on once the database is reachable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from chassis.errors import Unavailable
from experiment_service.catalog import ExperimentCatalog
from experiment_service.config_hub import ConfigHub
from experiment_service.store import ExperimentStore
from fresco.experiments.evaluator import StickyArms

if TYPE_CHECKING:
    from experiment_service.data_domain import DataDomain


@dataclass(frozen=True)
class Domain:
    """The service's domain objects: the catalog (and its store), the configuration hub gateways watch and the
    store keeping bandit units on their first arm. Other RPC groups add theirs as fields."""

    catalog: ExperimentCatalog
    hub: ConfigHub
    sticky: StickyArms | None = None  # None: bandit experiments cannot be assigned here
    data: DataDomain | None = None  # exposures, outcomes, results and decisions (experiment_service.data_domain)

    @property
    def store(self) -> ExperimentStore:
        """The experiment registry's storage."""
        return self.catalog.store


class DomainHolder:
    """Base of the servicer's RPC mixins: the domain once the service is ready, UNAVAILABLE before."""

    domain: Domain | None = None

    def _domain(self) -> Domain:
        if self.domain is None:
            raise Unavailable("experiment service is starting: its database is not reachable yet")
        return self.domain
