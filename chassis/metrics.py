"""Prometheus RPC metrics and the /metrics HTTP endpoint, one registry per service instance."""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Buckets from 100 µs to 10 s: the hot path lives in the low milliseconds.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)  # fmt: skip


class RpcMetrics:
    """RPC counts by method and code, latency histograms and in-flight gauges."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.registry = registry
        self.requests = Counter(
            "fresco_rpc_requests",
            "RPCs handled, by method and status code.",
            ["service", "method", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "fresco_rpc_latency_seconds",
            "RPC handling time, by method.",
            ["service", "method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "fresco_rpc_in_flight",
            "RPCs being handled now, by method.",
            ["service", "method"],
            registry=registry,
        )
        self.service = service

    def observe(self, method: str, code: str, seconds: float) -> None:
        """Record one finished RPC."""
        self.requests.labels(self.service, method, code).inc()
        self.latency.labels(self.service, method).observe(seconds)


class MetricsEndpoint:
    """The /metrics HTTP server, on its own thread so a busy event loop never starves scrapes."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._server.server_port)

    def close(self) -> None:
        """Stop serving scrapes."""
        self._server.shutdown()
        self._server.server_close()
