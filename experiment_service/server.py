"""Wiring of the experiment service: the registry database behind the servicer, on the chassis."""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis

from chassis.errors import Unavailable
from chassis.server import ServiceApp
from experiment_service.catalog import ExperimentCatalog
from experiment_service.config_hub import ConfigHub
from experiment_service.data_domain import DataDomain
from experiment_service.domain import Domain
from experiment_service.exposure_metrics import ExposureMetrics
from experiment_service.reweighting import BanditLoop
from experiment_service.service import METHOD_ROLES, SERVICE, ExperimentServicer
from experiment_service.settings import ExperimentServiceSettings
from experiment_service.store import ExperimentStore
from fresco.api.experiments.v1 import experiment_service_pb2_grpc as pb_grpc
from fresco.experiments.sticky import RedisStickyArms, SqliteStickyArms

log = logging.getLogger(__name__)


class ExperimentService:
    """A built experiment service: its server, and once ready its store and catalog."""

    def __init__(self, settings: ExperimentServiceSettings) -> None:
        self.settings = settings
        self.app = ServiceApp("experiment_service", settings, [SERVICE.full_name], method_roles=METHOD_ROLES)
        self.servicer = ExperimentServicer()
        pb_grpc.add_ExperimentServiceServicer_to_server(self.servicer, self.app.server)
        self.servicer.max_assign_units = settings.max_assign_units
        self.servicer.exposure_metrics = ExposureMetrics(self.app.registry)
        self.store: ExperimentStore | None = None
        self.data: DataDomain | None = None
        self.sticky: RedisStickyArms | SqliteStickyArms | None = None
        self.bandits: BanditLoop | None = None
        self._following: asyncio.Task[None] | None = None
        self.hub = ConfigHub()
        self.app.on_drain(self._stop_streaming)
        self.app.on_stop(self._close)

    async def ready(self) -> None:
        """Reach the database (retrying), read the running experiments back; then serve."""
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        store = self.store = await self._connect()
        catalog = ExperimentCatalog(store)
        config = await catalog.load()
        if config.revision:  # gateways holding the last revision published resume from it
            self.hub.seed(config)
        catalog.on_publish(self.hub.publish)
        data = self.data = await DataDomain.open(self.settings, self.app, catalog)
        catalog.holds = data.promoter  # arms' versions held in the model manager while running
        self.sticky = self._sticky()
        self.servicer.domain = Domain(catalog, self.hub, sticky=self.sticky, data=data)
        self.bandits = BanditLoop(catalog, data.stats, tick_s=self.settings.bandit_tick_s)
        self.bandits.start()
        self._following = asyncio.create_task(self._follow(catalog), name="follow-registry")
        log.info(
            "experiment service ready: registry on %s, %d running at revision %d; %s",
            store.engine.url.drivername, len(config.experiments), config.revision, data.describe(),
        )  # fmt: skip

    async def _connect(self) -> ExperimentStore:
        url = self.settings.registry_url()
        while True:
            try:
                return await asyncio.to_thread(ExperimentStore.open, url)
            except Unavailable as err:
                log.warning("database not reachable, retrying in %.1fs: %s", self.settings.connect_retry_s, err)
                await asyncio.sleep(self.settings.connect_retry_s)

    async def _follow(self, catalog: ExperimentCatalog) -> None:
        # Other replicas on the same database publish their changes to their own gateways; this one reads them back.
        while True:
            await asyncio.sleep(self.settings.follow_s)
            try:
                await catalog.refresh()
            except Exception as err:  # noqa: BLE001 (the database is down: the configuration held keeps serving)
                log.warning("could not read the registry's configuration revision: %s", err)

    def _sticky(self) -> RedisStickyArms | SqliteStickyArms:
        # Bandit units keep their first arm in Redis with --redis-url (shared with gateways given the same Redis),
        # else in the state directory.
        if self.settings.redis_url:
            return RedisStickyArms(Redis.from_url(self.settings.redis_url))
        return SqliteStickyArms(self.settings.state_dir / "sticky.db")

    async def _stop_streaming(self) -> None:
        # No re-weighting decided on the way out; and watch streams never end by themselves: they would hold the
        # drain for its whole grace period.
        if self.bandits is not None:
            await self.bandits.stop()
        if self._following is not None:
            self._following.cancel()
            await asyncio.gather(self._following, return_exceptions=True)
        self.hub.close()
        if self.data is not None:
            self.data.stop_streams()
        if self.servicer.domain is not None:
            await self.servicer.domain.catalog.close()

    async def _close(self) -> None:
        if isinstance(self.sticky, SqliteStickyArms):
            await self.sticky.close()
        elif self.sticky is not None:
            await self.sticky.client.aclose()
        if self.data is not None:
            await self.data.close()
        if self.store is not None:
            await asyncio.to_thread(self.store.close)


def build_server(settings: ExperimentServiceSettings) -> ExperimentService:
    """The experiment service, bound (port 0 picks a free port) but not started."""
    return ExperimentService(settings)
