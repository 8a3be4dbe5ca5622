"""Traces cross the gateway and the predictor: an OTLP/gRPC receiver runs in the test, both services
export to it, and one Predict call must come back as one trace of three linked spans."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from fresco.api.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from fresco.suite import Suite, start_suite
from tests.integration import CLIENT_OPTIONS, features_of

pytestmark = pytest.mark.integration

SERVER = trace_pb2.Span.SpanKind.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SpanKind.SPAN_KIND_CLIENT


@dataclass(frozen=True)
class ExportedSpan:
    service: str
    span: trace_pb2.Span

    @property
    def attributes(self) -> dict[str, str]:
        return {a.key: a.value.string_value for a in self.span.attributes}


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector keeping every span it is sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[ExportedSpan] = []
        self.endpoint = ""

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            for resource_spans in request.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self._spans.append(ExportedSpan(attributes.get("service.name", ""), span))
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[ExportedSpan]:
        with self._lock:
            return list(self._spans)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    collector = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    collector.endpoint = f"127.0.0.1:{port}"
    try:
        yield collector
    finally:
        server.stop(0).wait()


@pytest.fixture(scope="module")
def traced_suite(receiver: Receiver, repository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    """A predictor and a gateway of their own, both exporting spans to the receiver."""
    env = {"OTEL_BSP_SCHEDULE_DELAY": "100"}
    for service in ("PREDICTOR", "GATEWAY"):
        env[f"FRESCO_{service}_TRACING_EXPORTER"] = "otlp"
        env[f"FRESCO_{service}_OTLP_ENDPOINT"] = receiver.endpoint
    suite = start_suite(repository.root, env=env, log_dir=tmp_path_factory.mktemp("traced"))
    try:
        yield suite
    finally:
        suite.stop()


def wait_for(receiver: Receiver, found, timeout_s: float = 20.0):
    """Poll the receiver until `found(spans)` returns something truthy; that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        spans = receiver.spans()
        result = found(spans)
        if result:
            return result
        if time.monotonic() > deadline:
            names = sorted(f"{s.service}:{s.span.name}" for s in spans)
            pytest.fail(f"spans did not arrive within {timeout_s}s; got {names}")
        time.sleep(0.05)


def test_predict_is_one_trace_across_gateway_and_predictor(traced_suite: Suite, receiver: Receiver, sample) -> None:
    _, gateway = traced_suite.services
    with grpc.insecure_channel(gateway.address, options=CLIENT_OPTIONS) as channel:
        response = gateway_pb2_grpc.GatewayServiceStub(channel).Predict(
            gateway_pb2.PredictRequest(model="demo", features=features_of(sample[0])), timeout=10
        )
    trace_id = bytes.fromhex(response.trace_id)

    def three_spans(spans: list[ExportedSpan]):
        mine = [s for s in spans if s.span.trace_id == trace_id]
        server = [s for s in mine if s.service == "gateway" and s.span.kind == SERVER]
        client = [s for s in mine if s.service == "gateway" and s.span.kind == CLIENT and "ModelInfer" in s.span.name]
        infer = [s for s in mine if s.service == "predictor" and s.span.kind == SERVER and "ModelInfer" in s.span.name]
        return (server, client, infer) if server and client and infer else None

    server, client, infer = wait_for(receiver, three_spans)
    assert len(server) == len(client) == len(infer) == 1
    gateway_span, client_span, predictor_span = server[0].span, client[0].span, infer[0].span

    assert "fresco.gateway.v1.GatewayService/Predict" in gateway_span.name
    assert gateway_span.parent_span_id == b"", "the gateway starts the trace"
    assert "inference.GRPCInferenceService/ModelInfer" in client_span.name
    assert client_span.parent_span_id == gateway_span.span_id
    assert "inference.GRPCInferenceService/ModelInfer" in predictor_span.name
    assert predictor_span.parent_span_id == client_span.span_id
    assert gateway_span.trace_id == client_span.trace_id == predictor_span.trace_id == trace_id
    assert server[0].attributes["rpc.grpc.status_code"] == "OK"
    assert infer[0].attributes["rpc.grpc.status_code"] == "OK"
    # Each hop nests in time inside its parent.
    assert gateway_span.start_time_unix_nano <= client_span.start_time_unix_nano
    assert client_span.end_time_unix_nano <= gateway_span.end_time_unix_nano

    spans = receiver.spans()
    assert {s.service for s in spans} == {"gateway", "predictor"}
    assert not [s.span.name for s in spans if "grpc.health.v1" in s.span.name], "health checks are not traced"


def test_failed_predict_span_carries_the_error(traced_suite: Suite, receiver: Receiver, sample) -> None:
    _, gateway = traced_suite.services
    with grpc.insecure_channel(gateway.address, options=CLIENT_OPTIONS) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Predict(gateway_pb2.PredictRequest(model="no-such-model", features=features_of(sample[0])), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    def failed_predict(spans: list[ExportedSpan]):
        return [
            s
            for s in spans
            if s.service == "gateway"
            and s.span.kind == SERVER
            and s.attributes.get("rpc.grpc.status_code") == "NOT_FOUND"
        ]

    (failed,) = wait_for(receiver, failed_predict)
    assert "fresco.gateway.v1.GatewayService/Predict" in failed.span.name
    assert failed.span.status.code == trace_pb2.Status.StatusCode.STATUS_CODE_ERROR
    assert "no-such-model" in failed.span.status.message
