"""Wiring of the model manager: the registry database and the artifact store behind the servicer, on the chassis."""

from __future__ import annotations

import asyncio
import logging

from chassis.errors import Unavailable
from chassis.server import ServiceApp
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as pb_grpc
from model_manager.artifacts import ArtifactStore
from model_manager.controller import RolloutController
from model_manager.ports import FleetPort, RouteHubPort
from model_manager.registry import Registry
from model_manager.rollout_rpcs import RolloutRuntime
from model_manager.rollout_store import RolloutStore
from model_manager.service import METHOD_ROLES, Domain, ModelManagerServicer
from model_manager.settings import ModelManagerSettings
from model_manager.uploads import VersionUploads
from model_manager.xds import AdsService

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelManagerService"].full_name


class ModelManager:
    """A built model manager: its server, and once ready its registry and artifact store."""

    def __init__(
        self, settings: ModelManagerSettings, fleet: FleetPort | None = None, hub: RouteHubPort | None = None
    ) -> None:
        self.settings = settings
        self.fleet, self.hub = fleet, hub
        self.app = ServiceApp("model_manager", settings, [SERVICE_NAME], method_roles=METHOD_ROLES)
        # Route and fleet RPCs not built here: the generated base class answers them UNIMPLEMENTED.
        self.servicer = ModelManagerServicer()  # type: ignore[abstract]
        pb_grpc.add_ModelManagerServiceServicer_to_server(self.servicer, self.app.server)
        # The xDS server for Envoy and proxyless gRPC, fed the same route tables as the gateways' route hub.
        self.ads = AdsService()
        self.ads.add_to_server(self.app.server)
        self.registry: Registry | None = None
        self.controller: RolloutController | None = None
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
        self.servicer.domain = Domain(registry, VersionUploads(registry, store))
        rollout_store = await asyncio.to_thread(RolloutStore, registry.engine)
        self.controller = RolloutController(rollout_store, registry, self.fleet, self.hub, self.ads)
        await self.controller.start()
        self.servicer.rollouts = RolloutRuntime.of(self.controller, self.ads)
        log.info("model manager ready: registry on %s, artifacts in %s", registry.engine.url.drivername, store.root)

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

    async def _close(self) -> None:
        if self.controller is not None:
            await self.controller.stop()
        if self.registry is not None:
            await asyncio.to_thread(self.registry.close)


def build_server(
    settings: ModelManagerSettings, fleet: FleetPort | None = None, hub: RouteHubPort | None = None
) -> ModelManager:
    """The model manager, bound (port 0 picks a free port) but not started; rollouts run once a fleet and a
    route hub are given."""
    return ModelManager(settings, fleet, hub)
