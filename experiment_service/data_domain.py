"""The data side of the service (exposures, outcomes, results, decisions) and how the settings open it: statistics
in Redis with --redis-url, else SQLite in the state directory; promotions through --model-manager-address."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TypeVar

from chassis.errors import Unavailable
from chassis.server import ServiceApp
from chassis.streams import next_or_stop
from experiment_service.catalog import ExperimentCatalog
from experiment_service.decisions import Decisions
from experiment_service.domain import DomainHolder
from experiment_service.ingest import Ingest
from experiment_service.promoter import ModelManagerPromoter
from experiment_service.results import Results
from experiment_service.settings import ExperimentServiceSettings
from experiment_service.stats_redis import RedisStats
from experiment_service.stats_sqlite import SqliteStats
from experiment_service.stats_store import StatsStore

T = TypeVar("T")


@dataclass(frozen=True)
class DataDomain:
    """What LogExposures, LogOutcomes, GetResults(History) and DecideExperiment run on."""

    stats: StatsStore
    ingest: Ingest
    results: Results
    decisions: Decisions
    promoter: ModelManagerPromoter | None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    async def open(cls, settings: ExperimentServiceSettings, app: ServiceApp, catalog: ExperimentCatalog) -> DataDomain:
        """Open the statistics store and the model manager channel the settings name."""
        stats: StatsStore
        every = settings.stats_snapshot_every_s
        if settings.redis_url:
            stats = RedisStats.from_url(settings.redis_url, prefix=settings.stats_redis_prefix, snapshot_every_s=every)
        else:
            stats = await SqliteStats.open(settings.state_dir / "stats.db", snapshot_every_s=every)
        promoter = None
        if settings.model_manager_address:
            address = settings.model_manager_address
            channel = app.client_channel(address, token_file=settings.model_manager_token_file)
            promoter = ModelManagerPromoter(
                channel, address, settings.model_manager_timeout_s, settings.ship_canary_dwell_s
            )
        results = Results(catalog, stats)
        ingest = Ingest(catalog.get, stats, allocations=catalog.allocations)
        return cls(stats, ingest, results, Decisions(catalog, results, promoter), promoter)

    def describe(self) -> str:
        """One line for the start-up log."""
        where = "redis" if isinstance(self.stats, RedisStats) else "sqlite"
        manager = self.promoter.address if self.promoter else "none (shipping a version is refused)"
        return f"statistics in {where}, model manager {manager}"

    async def next_request(self, requests: AsyncIterator[T]) -> T | None:
        """The stream's next request; None at its end, or once the service is stopping (between batches)."""
        return await next_or_stop(requests, self.stopping)

    def stop_streams(self) -> None:
        """End the outcome streams at their next batch boundary: a drain need not wait for idle clients."""
        self.stopping.set()

    async def close(self) -> None:
        """Close the store and the channel."""
        await self.stats.close()
        if self.promoter is not None:
            await self.promoter.close()


class DataHolder(DomainHolder):
    """Base of the data RPC mixins: the data domain once the service is ready, UNAVAILABLE before."""

    def _data(self) -> DataDomain:
        data = self._domain().data
        if data is None:
            raise Unavailable("experiment service is starting: its statistics store is not open yet")
        return data
