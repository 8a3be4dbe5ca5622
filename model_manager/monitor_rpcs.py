"""The live monitoring RPC of ModelManagerService: GetModelMonitor (drift, null rates and parity per feature)."""

from __future__ import annotations

from chassis.errors import InvalidArgument, Unavailable
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from model_manager import schema
from model_manager.callers import Context
from model_manager.monitors import ModelMonitors

MAX_VERSIONS = 100


class MonitorRpcs:
    """Mixin of ModelManagerServicer: a model's live drift monitor."""

    monitors: ModelMonitors | None = None

    def _monitors(self) -> ModelMonitors:
        if self.monitors is None:
            raise Unavailable("model manager is starting: the drift monitor is not ready yet")
        return self.monitors

    async def GetModelMonitor(self, request: pb.GetModelMonitorRequest, context: Context) -> pb.GetModelMonitorResponse:
        monitors = self._monitors()
        schema.model_name("model_name", request.model_name)
        if len(request.versions) > MAX_VERSIONS:
            raise InvalidArgument(f"versions: expected at most {MAX_VERSIONS} versions, got {len(request.versions)}")
        for i, version in enumerate(request.versions):
            schema.version_number(f"versions[{i}]", version)
        return await monitors.answer(request.model_name, list(request.versions))
