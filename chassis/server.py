"""The server factory every service uses: grpc.aio with health, reflection, interceptors, metrics,
tracing and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.trace import Tracer
from prometheus_client import CollectorRegistry

from chassis.auth import AccessPolicy, Authenticator, Role
from chassis.interceptors import AuthInterceptor, ServerInterceptor, client_interceptors, wrap_registrations
from chassis.metrics import MetricsEndpoint, RpcMetrics
from chassis.settings import ServiceSettings
from chassis.tls import peer_security, server_credentials
from chassis.tracing import build_tracer_provider
from fresco.credentials import read_token

log = logging.getLogger(__name__)


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Message-size options for servers and channels alike."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


class ServiceApp:
    """One service's gRPC server with its health, reflection, telemetry and lifecycle.

    Services build one with their servicers, then `start()`, `set_serving(True)` once they can
    really serve, and `stop()` on shutdown. `method_roles` is the service's table of the role each
    method needs (`chassis.auth.method_roles`), enforced when the settings configure a token source.
    """

    def __init__(
        self,
        name: str,
        settings: ServiceSettings,
        service_names: Sequence[str],
        extra_options: Sequence[tuple[str, int]] = (),
        method_roles: Mapping[str, Role | None] | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.service_names = list(service_names)
        self.tracer_provider = build_tracer_provider(settings, name)
        self.tracer: Tracer = self.tracer_provider.get_tracer(name)
        self.registry = CollectorRegistry()
        self.rpc_metrics = RpcMetrics(self.registry, name)
        self.health = health.aio.HealthServicer()
        wrappers: list[ServerInterceptor | AuthInterceptor] = [
            ServerInterceptor(self.tracer, self.rpc_metrics, lambda: self.tracer_provider.listening)
        ]
        self.authenticator = Authenticator.from_settings(settings)
        if self.authenticator is not None:
            # After tracing, so refused calls are traced and counted with their codes.
            policy = AccessPolicy(method_roles or {}, settings.auth_require_for_reads)
            wrappers.append(AuthInterceptor(self.authenticator, policy))
        self.peer_security = peer_security(settings)
        # Read (and checked) before the server exists, so wrong files fail with nothing to clean up.
        credentials = server_credentials(settings)
        self.server = aio.server(options=[*channel_options(settings.max_message_bytes), *extra_options])
        # Tracing, metrics, error mapping and auth wrap each handler once as it is registered.
        wrap_registrations(self.server, wrappers)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        address = f"{settings.host}:{settings.port}"
        self.tls = credentials is not None
        self.port = (
            self.server.add_secure_port(address, credentials)
            if credentials is not None
            else self.server.add_insecure_port(address)
        )
        if self.port == 0:
            raise OSError(f"{name}: could not bind {settings.host}:{settings.port}")
        self.health_server: aio.Server | None = None
        self.health_port = 0
        if settings.health_port >= 0:
            # The same servicer, so both ports always report the same status.
            self.health_server = aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_port = self.health_server.add_insecure_port(f"{settings.host}:{settings.health_port}")
            if self.health_port == 0:
                raise OSError(f"{name}: could not bind the health port {settings.host}:{settings.health_port}")
        self.metrics_endpoint: MetricsEndpoint | None = None
        # Other listeners of the service (name to URL), announced after metrics, e.g. {"http": "http://…"}.
        self.endpoints: dict[str, str] = {}
        self._on_stop: list[Callable[[], Awaitable[None]]] = []
        self._on_drain: list[Callable[[], Awaitable[None]]] = []

    @property
    def address(self) -> str:
        """host:port of the gRPC server."""
        return f"{self.settings.host}:{self.port}"

    def client_channel(self, target: str, token_file: Path | None = None) -> aio.Channel:
        """A channel to another service carrying this service's trace context, limits, peer TLS and
        peer token, or the token in `token_file` for a peer that needs another role (a unix socket,
        reachable only on this machine, stays plaintext)."""
        security = self.peer_security
        if token_file is not None:
            security = replace(security, token=read_token(token_file))
        return security.aio_channel(
            target,
            options=channel_options(self.settings.max_message_bytes),
            interceptors=client_interceptors(self.tracer),
            tls=not target.startswith("unix:"),
        )

    def on_drain(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run `callback` as stopping starts, before the drain, e.g. to stop background work that decides things."""
        self._on_drain.append(callback)

    def on_stop(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run `callback` after the server has drained, e.g. to close channels and sessions."""
        self._on_stop.append(callback)

    async def start(self) -> None:
        """Start serving RPCs (health says NOT_SERVING until `set_serving(True)`)."""
        await self.set_serving(False)
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        if self.settings.metrics_port >= 0:
            self.metrics_endpoint = MetricsEndpoint(self.registry, self.settings.host, self.settings.metrics_port)

    async def set_serving(self, serving: bool) -> None:
        """Flip the health status of the server and each of its services."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ["", *self.service_names]:
            await self.health.set(service, status)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let in-flight ones finish within the grace period, then clean up."""
        await self.set_serving(False)
        for callback in reversed(self._on_drain):
            await callback()
        await self.server.stop(self.settings.grace_period_s if grace is None else grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        for callback in reversed(self._on_stop):
            await callback()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        self.tracer_provider.shutdown()

    def announce(self) -> None:
        """Print where the service listens, for people and for `fresco up` (which parses it)."""
        metrics = (
            f" metrics=http://{self.settings.host}:{self.metrics_endpoint.port}/metrics"
            if self.metrics_endpoint
            else ""
        )
        others = "".join(f" {name}={url}" for name, url in self.endpoints.items())
        print(f"{self.name} listening on {self.address}{metrics}{others}", flush=True)


async def serve(app: ServiceApp, ready: Callable[[], Awaitable[None]] | None = None) -> None:
    """Run `app` until SIGTERM or SIGINT, then drain and return.

    `ready` runs after the server has started (e.g. loading models); health turns SERVING when it
    returns. A failure in it is logged and leaves the service NOT_SERVING but alive.
    """
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await app.start()
    app.announce()

    async def become_ready() -> None:
        try:
            if ready is not None:
                await ready()
            await app.set_serving(True)
            log.info("%s serving on %s", app.name, app.address)
        except Exception:
            log.exception("%s failed to become ready; staying NOT_SERVING", app.name)

    readiness = asyncio.create_task(become_ready())
    await stopping.wait()
    log.info("%s stopping: draining in-flight calls for up to %.1fs", app.name, app.settings.grace_period_s)
    readiness.cancel()
    await app.stop()


def run(main: Awaitable[None]) -> None:
    """Run a service's main coroutine on uvloop; exit 0 after a clean stop."""
    import uvloop

    uvloop.run(main)  # type: ignore[arg-type]
    sys.stdout.flush()


__all__ = ["ServiceApp", "channel_options", "run", "serve"]
