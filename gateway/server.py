"""Wiring of the gateway: routes and predictor pool behind the gateway servicer, on the chassis."""

from __future__ import annotations

from chassis.server import ServiceApp
from gateway.features import FeatureClient
from gateway.limits import Limits
from gateway.offload import Offload
from gateway.pipeline import PredictionPipeline
from gateway.predictors import PredictorPool
from gateway.routing import RouteTable
from gateway.service import METHOD_ROLES, SERVICE_NAME, GatewayServicer
from gateway.settings import GatewaySettings


class Gateway:
    """A built gateway: its server and prediction pipeline."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.app = ServiceApp("gateway", settings, [SERVICE_NAME], method_roles=METHOD_ROLES)
        routes = RouteTable.static(settings.predictor, settings.routes_file)
        self.predictors = PredictorPool(
            self.app.client_channel,
            settings.predictor_timeout_s,
            settings.metadata_ttl_s,
            settings.default_version_ttl_s,
        )
        self.offload = Offload(settings.offload_above_bytes)
        self.features = (
            FeatureClient(self.app.client_channel, settings.feature_service, settings.feature_timeout_s)
            if settings.feature_service
            else None
        )
        limits = Limits(settings.max_batch_requests, settings.max_bytes_elements)
        self.pipeline = PredictionPipeline(routes, self.predictors, self.features, limits, self.offload)
        self.app.server.add_generic_rpc_handlers((GatewayServicer(self.pipeline).handlers(),))
        self.app.on_stop(self.predictors.close)
        self.app.on_stop(self.offload.close)
        if self.features is not None:
            self.app.on_stop(self.features.close)


def build_server(settings: GatewaySettings) -> Gateway:
    """The gateway, bound (port 0 picks a free port) but not started."""
    return Gateway(settings)
