"""Wiring of the model manager: the registry database and the artifact store behind the servicer, on the chassis."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from chassis.errors import Unavailable
from chassis.server import ServiceApp
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as pb_grpc
from model_manager import alert_rules, gate_config
from model_manager.artifacts import ArtifactStore
from model_manager.controller import RolloutController
from model_manager.drift_gauges import DriftGauges, DriftRefresher
from model_manager.fleet import Fleet
from model_manager.gate_schema import FeatureCatalog
from model_manager.gates import GateRunner
from model_manager.holds import HoldStore
from model_manager.loader import PredictorLoader, RegistryArtifacts
from model_manager.monitor_store import MonitorStore
from model_manager.monitors import ModelMonitors
from model_manager.operations import OperationStore
from model_manager.optimizer import Optimizer, spec_gate
from model_manager.ports import FleetPort, RouteHubPort
from model_manager.prediction_store import PredictionStore
from model_manager.predictors import Predictors
from model_manager.promotions import Promotions
from model_manager.quality_metrics import QualityMetrics
from model_manager.quality_store import QualityStore
from model_manager.registry import Registry
from model_manager.rollout_metrics import register_rollout_metrics
from model_manager.rollout_rpcs import RolloutRuntime
from model_manager.rollout_store import RolloutStore
from model_manager.route_hub import RouteHub
from model_manager.routes import MetricsConfig
from model_manager.safety_sources import SafetySources
from model_manager.service import METHOD_ROLES, Domain, ModelManagerServicer
from model_manager.settings import ModelManagerSettings
from model_manager.uploads import VersionUploads
from model_manager.xds import METHOD_ROLES as ADS_METHOD_ROLES
from model_manager.xds import AdsService

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelManagerService"].full_name


class ModelManager:
    """A built model manager: its server, and once ready its registry and artifact store."""

    def __init__(
        self, settings: ModelManagerSettings, fleet: FleetPort | None = None, hub: RouteHubPort | None = None
    ) -> None:
        self.settings = settings
        # The fleet built here (from the registry, once it is reachable) unless one is given.
        self.fleet: FleetPort | None = fleet
        self.own_fleet: Fleet | None = None
        self.app = ServiceApp(
            "model_manager", settings, [SERVICE_NAME], method_roles={**METHOD_ROLES, **ADS_METHOD_ROLES}
        )
        self.servicer = ModelManagerServicer()
        pb_grpc.add_ModelManagerServiceServicer_to_server(self.servicer, self.app.server)
        # The route stream needs no database: gateways may watch (and keep their table) from the start.
        self.route_hub = RouteHub()
        self.servicer.route_hub = self.route_hub
        self.hub: RouteHubPort = self.route_hub if hub is None else hub
        # The xDS server for Envoy and proxyless gRPC, fed the same route tables as the gateways' route hub.
        self.ads = AdsService()
        self.ads.add_to_server(self.app.server)
        self.registry: Registry | None = None
        self.controller: RolloutController | None = None
        self.monitors: ModelMonitors | None = None
        self.drift_gauges = DriftGauges(self.app.registry)
        self.drift_refresher: DriftRefresher | None = None
        self.quality_metrics = QualityMetrics(self.app.registry)
        self.quality_task: asyncio.Task[None] | None = None
        self.app.on_drain(self._stop_deciding)
        self.app.on_stop(self._close)

    async def ready(self) -> None:
        """Open the artifact store, then reach the database (retrying) and create its tables; then serve."""
        settings = self.settings
        if not settings.database_url or not settings.artifact_store_url:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = await asyncio.to_thread(ArtifactStore, settings.artifacts_url(), settings.max_artifact_bytes)
        # No upload runs before the service serves: whatever is in tmp/ was left by a crash.
        cleared = await asyncio.to_thread(store.clear_temporary)
        if cleared:
            log.warning("removed %d partial uploads left by an earlier run", cleared)
        registry = self.registry = await self._connect()
        if self.fleet is None:
            fleet = self._fleet(registry, store)
            await fleet.start()
            self.own_fleet = self.fleet = fleet
        uploads = VersionUploads(registry, store)
        self.servicer.domain = Domain(registry, uploads, fleet=self.own_fleet)
        catalog = self._catalog()
        monitor_store = await asyncio.to_thread(MonitorStore, registry.engine)
        monitors = self.monitors = ModelMonitors(registry, monitor_store, catalog)
        self.servicer.promotions = await self._promotions(registry, store, catalog, monitors)
        rollout_store = await asyncio.to_thread(RolloutStore, registry.engine)
        defaults = self.servicer.promotions.defaults
        self.servicer.optimizer = Optimizer(registry, store, uploads, spec_gate(rollout_store, defaults))
        holds = await asyncio.to_thread(HoldStore, registry.engine, registry)
        predictions = await asyncio.to_thread(PredictionStore, registry.engine)
        rules = await asyncio.to_thread(alert_rules.load_rules, settings.alert_rules)  # checked at start already
        self.servicer.safety = SafetySources(registry, rollout_store, monitor_store, rules)
        metrics = MetricsConfig(window_seconds=self.settings.metrics_window_s)
        self.controller = RolloutController(
            rollout_store, registry, self.fleet, self.hub, self.ads, metrics=metrics, gates=self.servicer.promotions,
            holds=holds,
        )  # fmt: skip
        await self.controller.start()
        register_rollout_metrics(self.app.registry, self.controller, self.route_hub)
        # The latency gate keeps a version it loaded only while a route or rollout uses it.
        promotions = self.servicer.promotions
        assert promotions is not None
        promotions.runner.in_use = self.controller.uses
        self.servicer.rollouts = RolloutRuntime.of(self.controller, self.ads)
        self.servicer.rollouts.verbs.monitor = monitor_store
        self.servicer.monitors = monitors
        # Its first pass merges the windows stored but not merged (a crash between the two; each id counts once).
        self.drift_refresher = DriftRefresher(
            monitors.drift, self.drift_gauges, monitors.basis_or_none, settings.drift_refresh_s,
            backlog=self.controller.ledger.windows(),
        )  # fmt: skip
        self.drift_refresher.start()
        self._quality(registry, predictions)
        log.info("model manager ready: registry on %s, artifacts in %s", registry.engine.url.drivername, store.root)

    def _fleet(self, registry: Registry, store: ArtifactStore) -> Fleet:
        settings = self.settings
        lease = settings.predictor_lease_s
        # A heartbeat received within two intervals of a load may predate it, and a copy taken out of routes is
        # unloaded a second later: the manager's word beats heartbeats that long. Lost leases are forgotten after 30.
        settle = max(2 * settings.heartbeat_interval_s, 2.0)
        predictors = Predictors(lease, settle_s=settle, forget_s=30 * lease)
        return Fleet(
            predictors,
            RegistryArtifacts(registry, store),
            # Through the chassis: peer TLS and the peer token (a deployer's) that predictors' loads require.
            PredictorLoader(self.app.client_channel, settings.predictor_load_timeout_s),
            heartbeat_interval_s=settings.heartbeat_interval_s,
            copy_request_rate=settings.copy_request_rate,
            tick_s=min(0.5, settings.heartbeat_interval_s),
            cooldown_s=lease,
            leftover_grace_s=settings.leftover_grace_s,
        )

    def _catalog(self) -> FeatureCatalog | None:
        settings = self.settings
        if not settings.feature_service_address:
            return None
        channel = self.app.client_channel(settings.feature_service_address)
        self.app.on_stop(channel.close)
        return FeatureCatalog(channel, settings.feature_service_address, settings.feature_service_timeout_s)

    async def _promotions(
        self, registry: Registry, store: ArtifactStore, catalog: FeatureCatalog | None, monitors: ModelMonitors
    ) -> Promotions:
        settings = self.settings
        runner = GateRunner(
            registry,
            store,
            self.app.client_channel,
            catalog,
            self.fleet,
            settings.latency_sample_requests,
            settings.latency_warmup_requests,
            monitors=monitors,
        )
        operations = await asyncio.to_thread(OperationStore, registry.engine)
        promotions = Promotions(registry, operations, runner, gate_config.parse_defaults(settings.default_gates_json))
        failed = await promotions.recover()
        if failed:
            log.warning("failed %d promotions a previous run left unfinished", failed)
        self.app.on_stop(promotions.close)
        return promotions

    def _quality(self, registry: Registry, predictions: PredictionStore) -> None:
        retention = self.settings.prediction_retention_s
        quality = QualityStore(predictions, registry, retention_s=retention, metrics=self.quality_metrics)
        self.servicer.quality = quality
        assert self.servicer.rollouts is not None
        self.servicer.rollouts.verbs.quality = quality
        self.quality_task = asyncio.create_task(quality.run(self.settings.quality_refresh_s))

    async def _connect(self) -> Registry:
        url = self.settings.registry_url()
        while True:
            try:
                return await asyncio.to_thread(Registry.open, url)
            except Unavailable as err:
                log.warning(
                    "registry database not reachable, retrying in %.1fs: %s", self.settings.connect_retry_s, err
                )
                await asyncio.sleep(self.settings.connect_retry_s)

    async def _stop_deciding(self) -> None:
        # Before the drain: a predictor whose heartbeats the draining server refuses would otherwise lose its lease
        # here, and the rollouts it serves be rolled back by a manager on its way out. The route streams end too:
        # they never end by themselves, and would hold the drain for its whole grace period. So do the xDS streams.
        self.route_hub.close()
        self.ads.close()
        if self.servicer.quality is not None:  # label streams end at their next batch boundary
            self.servicer.quality.stopping.set()
        if self.drift_refresher is not None:
            await self.drift_refresher.stop()
        if self.quality_task is not None:
            self.quality_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.quality_task
        if self.controller is not None:
            await self.controller.stop()
        if self.own_fleet is not None:
            await self.own_fleet.close()

    async def _close(self) -> None:
        if self.registry is not None:
            await asyncio.to_thread(self.registry.close)


def build_server(
    settings: ModelManagerSettings, fleet: FleetPort | None = None, hub: RouteHubPort | None = None
) -> ModelManager:
    """The model manager, bound (port 0 picks a free port) but not started; rollouts run once a fleet and a
    route hub are given."""
    return ModelManager(settings, fleet, hub)
