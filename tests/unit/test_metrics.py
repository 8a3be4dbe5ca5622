"""RPC metrics and the /metrics HTTP endpoint."""

from __future__ import annotations

import asyncio
import urllib.request

from prometheus_client import CollectorRegistry

from chassis.metrics import MetricsEndpoint, RpcMetrics


def _labels(method: str, code: str | None = None) -> dict[str, str]:
    labels = {"service": "predictor", "method": method}
    if code is not None:
        labels["code"] = code
    return labels


def test_rpc_metrics_count_by_method_and_code() -> None:
    registry = CollectorRegistry()
    metrics = RpcMetrics(registry, "predictor")
    infer = "/inference.GRPCInferenceService/ModelInfer"
    ready = "/inference.GRPCInferenceService/ServerReady"
    metrics.observe(infer, "OK", 0.002)
    metrics.observe(infer, "OK", 0.003)
    metrics.observe(infer, "INVALID_ARGUMENT", 0.0001)
    metrics.observe(ready, "OK", 0.5)

    def value(name: str, labels: dict[str, str]) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("fresco_rpc_requests_total", _labels(infer, "OK")) == 2
    assert value("fresco_rpc_requests_total", _labels(infer, "INVALID_ARGUMENT")) == 1
    assert value("fresco_rpc_requests_total", _labels(ready, "OK")) == 1
    assert value("fresco_rpc_requests_total", _labels(ready, "INTERNAL")) is None
    assert value("fresco_rpc_latency_seconds_count", _labels(infer)) == 3
    assert abs((value("fresco_rpc_latency_seconds_sum", _labels(infer)) or 0) - 0.0051) < 1e-9
    # 2 ms and 100 µs fall in the 2.5 ms bucket; 3 ms does not.
    assert value("fresco_rpc_latency_seconds_bucket", {**_labels(infer), "le": "0.0025"}) == 2
    assert value("fresco_rpc_latency_seconds_bucket", {**_labels(ready), "le": "0.25"}) == 0
    metrics.in_flight.labels("predictor", infer).inc()
    assert value("fresco_rpc_in_flight", _labels(infer)) == 1


def test_separate_registries_do_not_share_counts() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    RpcMetrics(first, "a").observe("/m", "OK", 0.01)
    RpcMetrics(second, "a")
    assert first.get_sample_value("fresco_rpc_requests_total", {"service": "a", "method": "/m", "code": "OK"}) == 1
    assert second.get_sample_value("fresco_rpc_requests_total", {"service": "a", "method": "/m", "code": "OK"}) is None


def _fetch(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read().decode()


async def test_metrics_endpoint_serves_over_http_on_a_free_port() -> None:
    registry = CollectorRegistry()
    RpcMetrics(registry, "gateway").observe("/fresco.gateway.v1.GatewayService/Predict", "NOT_FOUND", 0.01)
    endpoint = MetricsEndpoint(registry, "127.0.0.1", 0)
    try:
        assert endpoint.port > 0
        status, body = await asyncio.to_thread(_fetch, f"http://127.0.0.1:{endpoint.port}/metrics")
    finally:
        endpoint.close()
    assert status == 200
    assert (
        'fresco_rpc_requests_total{code="NOT_FOUND",method="/fresco.gateway.v1.GatewayService/Predict",'
        'service="gateway"} 1.0' in body
    )
    assert "# TYPE fresco_rpc_latency_seconds histogram" in body
