"""An inference call over HTTP is a server span in the caller's trace (W3C traceparent), with the
model's queue and compute spans under it, exported like the spans of gRPC calls."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fresco.suite import ServiceProcess
from tests.integration.rest import Http, infer_body
from tests.integration.test_tracing import SERVER, ExportedSpan, Receiver, receiver, wait_for

pytestmark = pytest.mark.integration
__all__ = ["receiver"]  # the collector fixture, shared with the gRPC tracing tests

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def traced(repository, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    root: Path = tmp_path_factory.mktemp("http-traced")
    service = ServiceProcess(
        "predictor",
        ["--model-repository", str(repository.root), "--port", "0"],
        env={
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "FRESCO_PREDICTOR_TRACING_EXPORTER": "otlp",
            "FRESCO_PREDICTOR_OTLP_ENDPOINT": receiver.endpoint,
        },
        log_path=root / "predictor.log",
    )
    try:
        service.start()
        service.wait_healthy()
        yield service
    finally:
        service.stop()


def test_an_http_inference_is_a_span_in_the_callers_trace(
    traced: ServiceProcess, receiver: Receiver, sample: np.ndarray
) -> None:
    client = Http(traced.http_url)
    try:
        assert client.json("GET", "/v2/health/ready")[0] == 200  # a probe: not traced
        status, answer = client.json(
            "POST", "/v2/models/demo/infer", infer_body(sample[:2]), traceparent=f"00-{TRACE_ID}-{PARENT_ID}-01"
        )
    finally:
        client.close()
    assert status == 200, answer
    trace_id = bytes.fromhex(TRACE_ID)

    def request_and_children(spans: list[ExportedSpan]) -> tuple[ExportedSpan, list[str]] | None:
        mine = [s for s in spans if s.span.trace_id == trace_id]
        server = [s for s in mine if s.span.kind == SERVER and s.span.name == "POST /v2/models/{name}/infer"]
        if not server:
            return None
        children = sorted(s.span.name for s in mine if s.span.parent_span_id == server[0].span.span_id)
        return (server[0], children) if {"queue", "compute"} <= set(children) else None

    server, children = wait_for(receiver, request_and_children)
    assert server.service == "predictor"
    assert server.span.parent_span_id == bytes.fromhex(PARENT_ID)
    assert server.attributes["rpc.grpc.status_code"] == "OK"
    assert server.attributes["http.route"] == "/v2/models/{name}/infer"
    assert {"queue", "compute"} <= set(children)
    assert not [s.span.name for s in receiver.spans() if "/v2/health" in s.span.name], "probes are not traced"
