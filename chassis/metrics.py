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
        self._methods: dict[str, MethodMetrics] = {}

    def observe(self, method: str, code: str, seconds: float) -> None:
        """Record one finished RPC."""
        self.for_method(method).observe(code, seconds)

    def for_method(self, method: str) -> MethodMetrics:
        """One method's metric children, bound once (label lookups cost more than the updates)."""
        bound = self._methods.get(method)
        if bound is None:
            bound = self._methods[method] = MethodMetrics(self, method)
        return bound


class MethodMetrics:
    """The children of one RPC method."""

    def __init__(self, metrics: RpcMetrics, method: str) -> None:
        self._metrics = metrics
        self.method = method
        self.in_flight = metrics.in_flight.labels(metrics.service, method)
        self.latency = metrics.latency.labels(metrics.service, method)
        self._codes: dict[str, Counter] = {}

    def observe(self, code: str, seconds: float) -> None:
        """Record one finished call."""
        counter = self._codes.get(code)
        if counter is None:
            counter = self._codes[code] = self._metrics.requests.labels(self._metrics.service, self.method, code)
        counter.inc()
        self.latency.observe(seconds)


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
