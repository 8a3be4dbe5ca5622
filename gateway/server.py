"""Wiring of the gateway: routes and predictor pool behind the gateway servicer, on the chassis."""

from __future__ import annotations

import os
import socket
from functools import partial
from pathlib import Path
from typing import Final

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from chassis.server import ServiceApp, channel_options
from fresco.experiments.sticky import RedisStickyArms, SqliteStickyArms, StickyArms
from gateway.experiment_arms import ExperimentArms
from gateway.experiment_watch import ExperimentWatcher
from gateway.exposures import ExposureLog
from gateway.features import FeatureClient
from gateway.lean_channels import LeanChannels
from gateway.limits import Limits
from gateway.metric_windows import MetricWindows, WindowReporter
from gateway.offload import Offload
from gateway.pipeline import PredictionPipeline
from gateway.predictors import PredictorPool
from gateway.route_choice import RouteChooser
from gateway.route_watch import RouteWatcher
from gateway.routing import RouteTable
from gateway.service import METHOD_ROLES, SERVICE_NAME, GatewayServicer
from gateway.settings import GatewaySettings
from gateway.shadow import ShadowMirror
from model_manager.routes import DEFAULT_WINDOW_S

STICKY_FILE: Final = "sticky.db"
_STICKY_TIMEOUT_S: Final = 1.0


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
            lean=LeanChannels(self.app.peer_security, channel_options(settings.max_message_bytes)),
            merge_in_flight=settings.merge_in_flight,
            merge_max_rows=settings.merge_max_rows,
            # Half a message for the inputs and answer rows: the rest of the call has room.
            merge_max_bytes=settings.max_message_bytes // 2,
            registry=self.app.registry,
        )
        self.offload = Offload(settings.offload_above_bytes)
        self.features = (
            FeatureClient(self.app.client_channel, settings.feature_service, settings.feature_timeout_s)
            if settings.feature_service
            else None
        )
        limits = Limits(settings.max_batch_requests, settings.max_bytes_elements)
        self.watcher: RouteWatcher | None = None
        self.reporter: WindowReporter | None = None
        windows = None
        chooser = RouteChooser(routes)
        gateway_id = settings.gateway_id or f"{socket.gethostname()}-{os.getpid()}"
        if settings.model_manager_address:
            manager_channel = partial(self.app.client_channel, token_file=settings.model_manager_token_file)
            self.watcher = watcher = RouteWatcher(
                manager_channel,
                settings.model_manager_address,
                gateway_id,
                settings.state_dir,
                self.app.registry,
                backoff_s=(0.1, settings.route_backoff_max_s),
            )
            chooser = RouteChooser(routes, lambda: watcher.table)
            windows = MetricWindows(
                gateway_id,
                value_sketches=settings.value_sketches,
                record_cap=settings.prediction_records_per_window,
            )
            self.reporter = WindowReporter(
                windows,
                manager_channel,
                settings.model_manager_address,
                gateway_id,
                lambda: watcher.table.metrics.window_seconds if watcher.table is not None else DEFAULT_WINDOW_S,
                self.app.registry,
                max_attempts=settings.report_attempts,
            )
        self.experiments = self._experiments(settings, gateway_id)
        self.pipeline = PredictionPipeline(
            chooser, self.predictors, self.features, limits, self.offload, windows, self.experiments
        )
        if self.watcher is not None:
            self.pipeline.calls.shadow = ShadowMirror(
                self.pipeline.calls.shadow_call,
                windows,
                self.app.registry,
                settings.shadow_queue_size,
                settings.shadow_workers,
                settings.shadow_timeout_s,
            )
        self.app.server.add_generic_rpc_handlers((GatewayServicer(self.pipeline).handlers(),))
        self.app.on_stop(self.predictors.close)
        if self.pipeline.calls.shadow is not None:
            self.app.on_stop(self.pipeline.calls.shadow.close)
        if self.reporter is not None:
            self.app.on_stop(self.reporter.close)
        if self.watcher is not None:
            self.app.on_stop(self.watcher.close)
        if self.experiment_watcher is not None:
            self.app.on_stop(self.experiment_watcher.close)
        if self.exposures is not None:
            self.app.on_stop(self.exposures.close)
        self.app.on_stop(self.offload.close)
        if self.features is not None:
            self.app.on_stop(self.features.close)

    def _experiments(self, settings: GatewaySettings, gateway_id: str) -> ExperimentArms | None:
        """Assignment from the experiment service's configuration stream, exposures sent back to it."""
        self.experiment_watcher: ExperimentWatcher | None = None
        self.exposures: ExposureLog | None = None
        if not settings.experiment_service:
            return None
        channel = partial(self.app.client_channel, token_file=settings.experiment_service_token_file)
        backoff = (0.1, settings.route_backoff_max_s)
        self.experiment_watcher = watcher = ExperimentWatcher(
            channel, settings.experiment_service, gateway_id, settings.state_dir, self.app.registry, backoff
        )
        self.exposures = ExposureLog(
            channel,
            settings.experiment_service,
            gateway_id,
            self.app.registry,
            queue_size=settings.exposure_queue,
            backoff_s=backoff,
            state_dir=settings.state_dir,
        )
        watcher.on_connect(self.exposures.wake)
        return ExperimentArms(lambda: watcher.evaluator, self.app.registry, self._sticky(settings), self.exposures)

    def _sticky(self, settings: GatewaySettings) -> StickyArms:
        """Where bandit units keep their first arm: Redis shared by the gateways, else SQLite in the state dir."""
        if settings.sticky_redis_url:
            # Short timeouts: a claim is on the request path, and a failed one leaves the request out of the bandits.
            client = Redis.from_url(
                settings.sticky_redis_url,
                socket_connect_timeout=_STICKY_TIMEOUT_S,
                socket_timeout=_STICKY_TIMEOUT_S,
                retry=Retry(NoBackoff(), 1),
            )
            self.app.on_stop(client.aclose)
            return RedisStickyArms(client)
        path: Path | str = ":memory:"
        if settings.state_dir is not None:
            settings.state_dir.mkdir(parents=True, exist_ok=True)
            path = settings.state_dir / STICKY_FILE
        store = SqliteStickyArms(path)
        self.app.on_stop(store.close)
        return store


def build_server(settings: GatewaySettings) -> Gateway:
    """The gateway, bound (port 0 picks a free port) but not started."""
    return Gateway(settings)


async def start_background(gateway: Gateway) -> None:
    """Start watching routes and reporting windows (after the server started, on its loop)."""
    if gateway.watcher is not None:
        gateway.watcher.start()
    if gateway.reporter is not None:
        gateway.reporter.start()
    if gateway.experiment_watcher is not None:
        gateway.experiment_watcher.start()
    if gateway.exposures is not None:
        gateway.exposures.start()
