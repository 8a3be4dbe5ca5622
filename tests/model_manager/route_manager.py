"""The model manager's route stream served in the test process, so a test can publish tables into
its RouteHub: the real ModelManagerServicer (WatchRoutes from RouteRpcs) on the chassis server,
with every stream message recorded. ReportMetrics, built by another part, is answered here by
recording the windows (optionally failing first), the receiving end the gateway's reporter needs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from chassis.server import ServiceApp
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as pb_grpc
from model_manager.route_hub import RouteHub
from model_manager.server import SERVICE_NAME
from model_manager.service import METHOD_ROLES, ModelManagerServicer
from model_manager.settings import ModelManagerSettings


class RecordingServicer(ModelManagerServicer):
    """The real servicer, its route streams tapped; ReportMetrics records windows."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[pb.WatchRoutesRequest] = []
        self.sent: list[pb.WatchRoutesResponse] = []
        self.reports: list[pb.ReportMetricsRequest] = []
        self.fail_reports = 0  # the next this many reports fail with UNAVAILABLE
        self.seen_windows: set[str] = set()

    async def WatchRoutes(  # type: ignore[override]
        self, request_iterator: AsyncIterator[pb.WatchRoutesRequest], context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchRoutesResponse]:
        async def tap() -> AsyncIterator[pb.WatchRoutesRequest]:
            async for request in request_iterator:
                self.received.append(request)
                yield request

        async for response in super().WatchRoutes(tap(), context):
            self.sent.append(response)
            yield response

    async def ReportMetrics(
        self, request: pb.ReportMetricsRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ReportMetricsResponse:
        self.reports.append(request)
        if self.fail_reports > 0:
            self.fail_reports -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "test: report refused once")
        fresh = [w.window_id for w in request.windows if w.window_id not in self.seen_windows]
        self.seen_windows.update(fresh)
        return pb.ReportMetricsResponse(
            accepted_windows=len(fresh), duplicate_windows=len(request.windows) - len(fresh)
        )


class RouteManager:
    """A model manager's route stream on a port (0 picks one), publishing from `hub`."""

    def __init__(self, port: int = 0, hub: RouteHub | None = None) -> None:
        settings = ModelManagerSettings(port=port, metrics_port=-1, grace_period_s=0.2)
        self.app = ServiceApp("model_manager", settings, [SERVICE_NAME], method_roles=METHOD_ROLES)
        self.hub = hub or RouteHub()
        self.servicer = RecordingServicer()  # type: ignore[abstract]
        self.servicer.route_hub = self.hub
        pb_grpc.add_ModelManagerServiceServicer_to_server(self.servicer, self.app.server)

    @property
    def address(self) -> str:
        return self.app.address

    async def start(self) -> RouteManager:
        await self.app.start()
        await self.app.set_serving(True)
        return self

    async def stop(self) -> None:
        await self.app.stop(0.2)
