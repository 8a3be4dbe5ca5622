"""Wiring of the model manager: the registry database and the artifact store behind the servicer, on the chassis."""

from __future__ import annotations

import asyncio
import logging

from chassis.errors import Unavailable
from chassis.server import ServiceApp
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as pb_grpc
from model_manager.artifacts import ArtifactStore
from model_manager.registry import Registry
from model_manager.route_hub import RouteHub
from model_manager.service import METHOD_ROLES, Domain, ModelManagerServicer
from model_manager.settings import ModelManagerSettings
from model_manager.uploads import VersionUploads

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelManagerService"].full_name


class ModelManager:
    """A built model manager: its server, and once ready its registry and artifact store."""

    def __init__(self, settings: ModelManagerSettings) -> None:
        self.settings = settings
        self.app = ServiceApp("model_manager", settings, [SERVICE_NAME], method_roles=METHOD_ROLES)
        # Rollout RPCs are not built yet: the generated base class answers them UNIMPLEMENTED.
        self.servicer = ModelManagerServicer()  # type: ignore[abstract]
        pb_grpc.add_ModelManagerServiceServicer_to_server(self.servicer, self.app.server)
        # The route stream needs no database: gateways may watch (and keep their table) from the start.
        self.route_hub = RouteHub()
        self.servicer.route_hub = self.route_hub
        self.registry: Registry | None = None
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
        if self.registry is not None:
            await asyncio.to_thread(self.registry.close)


def build_server(settings: ModelManagerSettings) -> ModelManager:
    """The model manager, bound (port 0 picks a free port) but not started."""
    return ModelManager(settings)
