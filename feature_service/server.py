"""Wiring of the feature service: definitions, the tiered store (memory in front of SQLite, or of Redis
and Cassandra) and the domain objects behind the servicer, on the chassis."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from chassis.errors import Unavailable
from chassis.server import ServiceApp
from feature_service.bloom import BloomFilters
from feature_service.materialize import MaterializeProgress, Materializer
from feature_service.metrics import FeatureMetrics
from feature_service.parity import ParityChecker, offline_views
from feature_service.reader import Catalog, FeatureReader
from feature_service.records import DurableTier
from feature_service.service import (
    METHOD_ROLES,
    SERVICE_NAME,
    Domain,
    FeatureServicer,
    add_to_server,
    materialize_response,
    spec_from_proto,
)
from feature_service.settings import FeatureServiceSettings
from feature_service.store import Observer, TieredStore
from feature_service.tiers.memory import MemoryCache
from feature_service.tiers.sqlite import SQLiteTier
from feature_service.writer import FeatureWriter
from fresco.api.features.v1 import feature_service_pb2 as pb
from fresco.features.definitions import FeatureView, load_definitions

log = logging.getLogger(__name__)


def load_catalog(settings: FeatureServiceSettings) -> Catalog:
    """The definitions file as a catalog (InvalidArgument naming the file and field if it is wrong)."""
    definitions = load_definitions(settings.definitions)
    return Catalog(definitions, settings.definitions.stat().st_mtime)


def load_offline_views(settings: FeatureServiceSettings, catalog: Catalog) -> dict[str, FeatureView]:
    """The views the parity check's offline side resolves with if they are not the served ones."""
    path = settings.parity_offline_definitions
    if path is None:
        return {}
    return offline_views(catalog, load_definitions(path), str(path))


async def open_durable(settings: FeatureServiceSettings) -> DurableTier:
    """Connect to the configured tier of record; Unavailable while it cannot be reached."""
    if settings.backend == "sqlite":
        tier = SQLiteTier(settings.sqlite_path)
        await tier.connect()
        return tier
    from feature_service.tiers.cassandra import CassandraTier  # only this backend needs the driver

    return await CassandraTier.open(
        settings.cassandra_contact_points, settings.cassandra_port, settings.cassandra_keyspace
    )


def build_store(
    settings: FeatureServiceSettings, durable: DurableTier, observer: Observer | None, blooms: bool = True
) -> TieredStore:
    """The memory tier in front of the durable one, with Redis and its invalidation bus in between if configured."""
    memory = MemoryCache(settings.memory_max_entries, settings.memory_ttl_s)
    if settings.backend == "sqlite":
        # One process owns the file's writes; another one (the CLI) is noticed through the statistics poll.
        return TieredStore(
            memory,
            None,
            durable,
            BloomFilters() if blooms else None,
            None,
            observer=observer,
            bloom_refresh_s=settings.bloom_refresh_s,
        )
    from feature_service.invalidation import Invalidator
    from feature_service.tiers.redis import RedisTier

    return TieredStore(
        memory,
        RedisTier(settings.redis_url, ttl_s=settings.redis_ttl_s, cluster=settings.redis_cluster),
        durable,
        BloomFilters() if blooms else None,
        Invalidator(settings.redis_url, cluster=settings.redis_cluster),
        observer=observer,
        bloom_refresh_s=settings.bloom_refresh_s,
        miss_poll_s=settings.redis_miss_poll_s,
    )


class FeatureService:
    """A built feature service: its server, and once ready its store and domain objects."""

    def __init__(self, settings: FeatureServiceSettings) -> None:
        self.settings = settings
        self.app = ServiceApp("feature_service", settings, [SERVICE_NAME], method_roles=METHOD_ROLES)
        self.metrics = FeatureMetrics(self.app.registry)
        self.servicer = FeatureServicer()
        add_to_server(self.servicer, self.app.server)
        self.store: TieredStore | None = None
        self.parity: ParityChecker | None = None
        self._poller: asyncio.Task[None] | None = None
        self.app.on_stop(self._close)

    async def ready(self) -> None:
        """Load definitions, connect the durable tier (retrying), load statistics, build bloom filters."""
        settings = self.settings
        catalog = load_catalog(settings)
        durable = await self._connect()
        store = self.store = build_store(settings, durable, self.metrics.observe_tier)
        await catalog.refresh(durable)
        await store.start(list(catalog.views))
        materializer = Materializer(
            catalog,
            store,
            durable,
            self.metrics,
            chunk_rows=settings.materialize_chunk_rows,
            max_rejections=settings.max_rejections_reported,
            max_future_s=settings.max_future_s,
            source_dirs=settings.materialize_source_dirs,
        )
        parity = self.parity = ParityChecker(
            catalog,
            materializer,
            self.app.registry,
            sample_rate=settings.parity_sample_rate,
            queue_size=settings.parity_queue_size,
            max_entities=settings.parity_max_entities,
            offline_views=load_offline_views(settings, catalog),
        )
        parity.start()
        self.servicer.domain = Domain(
            catalog=catalog,
            reader=FeatureReader(store, self.metrics, parity),
            writer=FeatureWriter(
                catalog,
                store,
                self.metrics,
                max_future_s=settings.max_future_s,
                require_event_timestamp=settings.require_event_timestamp,
                max_rejections=settings.max_rejections_reported,
            ),
            materializer=materializer,
            max_values=settings.max_values_per_get,
            parity=parity,
        )
        self._poller = asyncio.create_task(self._follow_statistics(catalog, store, durable), name="statistics poll")
        log.info("feature service ready: %d views on %s", len(catalog.views), settings.backend)

    async def _connect(self) -> DurableTier:
        while True:
            try:
                return await open_durable(self.settings)
            except Unavailable as err:
                log.warning("durable tier not reachable, retrying in %.1fs: %s", self.settings.connect_retry_s, err)
                await asyncio.sleep(self.settings.connect_retry_s)

    async def _follow_statistics(self, catalog: Catalog, store: TieredStore, durable: DurableTier) -> None:
        """Notice materialisations done by another process (the CLI in process): their statistics change
        last, so when they do, every record is written; reload the view's memory tier and bloom filter."""
        while True:
            await asyncio.sleep(self.settings.statistics_poll_s)
            try:
                for view in await catalog.refresh(durable):
                    log.info("statistics of %s changed in the durable tier: reloading the view", view)
                    await store.refresh_view(view)
            except Unavailable as err:
                log.warning("statistics poll failed: %s", err)
            except Exception:  # the poll must outlive any one failure
                log.exception("statistics poll failed")

    async def _close(self) -> None:
        if self.parity is not None:
            await self.parity.close()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self.store is not None:
            await self.store.close()


def build_server(settings: FeatureServiceSettings) -> FeatureService:
    """The feature service, bound (port 0 picks a free port) but not started."""
    return FeatureService(settings)


async def materialize_in_process(
    settings: FeatureServiceSettings,
    request: pb.MaterializeRequest,
    report: Callable[[str, int, int], None] | None = None,
) -> pb.MaterializeResponse:
    """Materialise in this process against the stores the settings name, as `fresco features materialize`
    does without --service. Redis replicas hear of the writes through the invalidation bus; a service on
    the same SQLite file notices the new statistics within --statistics-poll-s."""
    catalog = load_catalog(settings)
    spec = spec_from_proto(request)
    catalog.entry(spec.view)  # fail on an unknown view before connecting anywhere
    durable = await open_durable(settings)
    store = build_store(settings, durable, None, blooms=False)
    try:
        await store.start([])  # subscribes to the invalidation bus, so writes are announced
        materializer = Materializer(
            catalog,
            store,
            durable,
            chunk_rows=settings.materialize_chunk_rows,
            max_rejections=settings.max_rejections_reported,
            max_future_s=settings.max_future_s,
            # The invoking user reads a file of their own choosing, with their own rights: unless directories
            # are configured, any file they can read (the RPC, serving others, reads only configured ones).
            source_dirs=settings.materialize_source_dirs or None,
        )

        def progress(step: MaterializeProgress) -> None:
            if report is not None:
                report(step.phase, step.done, step.total)

        return materialize_response(await materializer.run(spec, progress))
    finally:
        await store.close()
