"""ServiceApp and its interceptors, in process: a grpc.aio server with a tiny generic service."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id
from pydantic_settings import SettingsConfigDict

from chassis.errors import InvalidArgument, NotFound, Unavailable
from chassis.server import ServiceApp
from chassis.settings import ServiceSettings

SERVICE = "fresco.unittest.v1.Probe"
ECHO = f"/{SERVICE}/Echo"
COUNT = f"/{SERVICE}/Count"
TOTAL = f"/{SERVICE}/Total"
SIX_MIB = 6 * 1024 * 1024
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"


class ModelWarming(Unavailable):
    """A domain error subclass: must map through its parent."""


class Probe:
    """Handlers of the test service; requests and responses are raw bytes."""

    def __init__(self) -> None:
        self.slow_started = asyncio.Event()
        self.slow_finished = False

    async def echo(self, request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
        match request:
            case b"invalid":
                raise InvalidArgument("field x: expected y")
            case b"missing":
                raise NotFound("model 'nope' is not loaded")
            case b"warming":
                raise ModelWarming("model 'demo' is warming up")
            case b"boom":
                raise RuntimeError("secret internal detail 0xdeadbeef")
            case b"deny":
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not for you")
            case b"big":
                return b"r" * SIX_MIB
            case b"slow":
                self.slow_started.set()
                await asyncio.sleep(0.5)
                self.slow_finished = True
                return b"slow done"
        return b"echo:" + request[:16] + b":" + str(len(request)).encode()

    async def count(self, request: bytes, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        for i in range(3):
            yield str(i).encode()
            if request == b"fail":
                raise InvalidArgument("stream item 1: expected more")

    async def total(self, requests: AsyncIterator[bytes], context: aio.ServicerContext[Any, Any]) -> bytes:
        size = 0
        async for chunk in requests:
            if chunk == b"bad":
                raise InvalidArgument("chunk 'bad': expected anything else")
            size += len(chunk)
        return str(size).encode()


def _add_probe(app: ServiceApp, probe: Probe) -> None:
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(probe.echo),
            "Count": grpc.unary_stream_rpc_method_handler(probe.count),
            "Total": grpc.stream_unary_rpc_method_handler(probe.total),
        },
    )
    app.server.add_generic_rpc_handlers((handler,))


class ProbeSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FRESCO_UNITPROBE_")


def _settings(**overrides: Any) -> ServiceSettings:
    values: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": -1, "tracing_exporter": "none"}
    return ProbeSettings(**{**values, **overrides})


class Running:
    """A started app, its probe, a plain client channel and the spans it exported."""

    def __init__(self, app: ServiceApp, probe: Probe, channel: aio.Channel, spans: InMemorySpanExporter) -> None:
        self.app, self.probe, self.channel, self.exporter = app, probe, channel, spans

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def count(self, method: str, code: str) -> float:
        labels = {"service": "probe", "method": method, "code": code}
        return self.app.registry.get_sample_value("fresco_rpc_requests_total", labels) or 0.0


@pytest.fixture(scope="module")
async def running() -> AsyncIterator[Running]:
    app = ServiceApp("probe", _settings(), [SERVICE])
    exporter = InMemorySpanExporter()
    app.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    probe = Probe()
    _add_probe(app, probe)
    await app.start()
    channel = aio.insecure_channel(app.address)
    try:
        yield Running(app, probe, channel, exporter)
    finally:
        await channel.close()
        await app.stop(grace=1)


@pytest.fixture
def served(running: Running) -> Running:
    running.exporter.clear()
    return running


async def _echo(channel: aio.Channel, payload: bytes, **kwargs: Any) -> bytes:
    result: bytes = await channel.unary_unary(ECHO)(payload, timeout=10, **kwargs)
    return result


async def _eventually(check: Callable[[], bool]) -> None:
    """Wait for `check` to hold. An aborted call's status goes out from inside `context.abort()`, so
    its client may see the error a moment before the interceptor has recorded the call."""
    async with asyncio.timeout(5):
        while not check():  # noqa: ASYNC110 - the interceptor offers no event to wait on
            await asyncio.sleep(0.005)


async def _error_of(call: Any) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_unary_call_succeeds_and_is_counted(served: Running) -> None:
    before = served.count(ECHO, "OK")
    assert await _echo(served.channel, b"hello") == b"echo:hello:5"
    assert served.count(ECHO, "OK") == before + 1
    assert served.app.registry.get_sample_value("fresco_rpc_in_flight", {"service": "probe", "method": ECHO}) == 0


@pytest.mark.parametrize(
    ("payload", "code", "message"),
    [
        (b"invalid", grpc.StatusCode.INVALID_ARGUMENT, "field x: expected y"),
        (b"missing", grpc.StatusCode.NOT_FOUND, "model 'nope' is not loaded"),
        (b"warming", grpc.StatusCode.UNAVAILABLE, "model 'demo' is warming up"),
        (b"deny", grpc.StatusCode.PERMISSION_DENIED, "not for you"),
    ],
)
async def test_domain_errors_arrive_with_mapped_code_and_message(
    served: Running, payload: bytes, code: grpc.StatusCode, message: str
) -> None:
    before = served.count(ECHO, code.name)
    err = await _error_of(_echo(served.channel, payload))
    assert err.code() is code
    assert err.details() == message
    await _eventually(lambda: served.count(ECHO, code.name) >= before + 1)
    assert served.count(ECHO, code.name) == before + 1


async def test_unexpected_exception_is_internal_without_its_text(served: Running) -> None:
    before = served.count(ECHO, "INTERNAL")
    err = await _error_of(_echo(served.channel, b"boom"))
    assert err.code() is grpc.StatusCode.INTERNAL
    assert err.details() == f"internal error in {ECHO}"
    assert "secret" not in (err.details() or "")
    assert "deadbeef" not in (err.debug_error_string() or "")
    await _eventually(lambda: served.count(ECHO, "INTERNAL") >= before + 1)
    assert served.count(ECHO, "INTERNAL") == before + 1
    # The server lives on.
    assert await _echo(served.channel, b"again") == b"echo:again:5"


async def test_unary_stream_success_and_mid_stream_domain_error(served: Running) -> None:
    call = served.channel.unary_stream(COUNT)(b"go", timeout=10)
    assert [item async for item in call] == [b"0", b"1", b"2"]
    assert await call.code() is grpc.StatusCode.OK

    before = served.count(COUNT, "INVALID_ARGUMENT")
    received: list[bytes] = []

    async def collect() -> None:
        async for item in served.channel.unary_stream(COUNT)(b"fail", timeout=10):
            received.append(item)

    err = await _error_of(collect())
    assert received == [b"0"]
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "stream item 1: expected more"
    await _eventually(lambda: served.count(COUNT, "INVALID_ARGUMENT") >= before + 1)
    assert served.count(COUNT, "INVALID_ARGUMENT") == before + 1


async def test_stream_unary_success_and_domain_error(served: Running) -> None:
    async def chunks(*items: bytes) -> AsyncIterator[bytes]:
        for item in items:
            yield item

    ok_before, invalid_before = served.count(TOTAL, "OK"), served.count(TOTAL, "INVALID_ARGUMENT")
    assert await served.channel.stream_unary(TOTAL)(chunks(b"ab", b"cde"), timeout=10) == b"5"
    err = await _error_of(served.channel.stream_unary(TOTAL)(chunks(b"ok", b"bad"), timeout=10))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "chunk 'bad': expected anything else"
    assert served.count(TOTAL, "OK") == ok_before + 1
    await _eventually(lambda: served.count(TOTAL, "INVALID_ARGUMENT") >= invalid_before + 1)
    assert served.count(TOTAL, "INVALID_ARGUMENT") == invalid_before + 1


async def test_health_follows_set_serving() -> None:
    app = ServiceApp("probe", _settings(), [SERVICE])
    _add_probe(app, Probe())
    await app.start()
    try:
        async with aio.insecure_channel(app.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def status(service: str) -> int:
                response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                return int(response.status)

            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            serving = health_pb2.HealthCheckResponse.SERVING
            assert await status("") == not_serving
            assert await status(SERVICE) == not_serving
            await app.set_serving(True)
            assert await status("") == serving
            assert await status(SERVICE) == serving
            await app.set_serving(False)
            assert await status(SERVICE) == not_serving
            err = await _error_of(stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5))
            assert err.code() is grpc.StatusCode.NOT_FOUND
    finally:
        await app.stop(grace=0)


async def test_reflection_lists_the_service(served: Running) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(served.channel)

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names = set()
    async for response in stub.ServerReflectionInfo(requests(), timeout=5):
        names |= {service.name for service in response.list_services_response.service}
    assert SERVICE in names
    assert "grpc.health.v1.Health" in names


async def test_health_and_reflection_calls_are_neither_traced_nor_counted(served: Running) -> None:
    await _echo(served.channel, b"counted")
    served.exporter.clear()
    await health_pb2_grpc.HealthStub(served.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for _ in reflection_pb2_grpc.ServerReflectionStub(served.channel).ServerReflectionInfo(requests(), timeout=5):
        pass
    assert served.spans() == []
    methods = {
        sample.labels["method"]
        for metric in served.app.registry.collect()
        for sample in metric.samples
        if sample.name == "fresco_rpc_requests_total"
    }
    assert ECHO in methods
    assert not any(method.startswith(("/grpc.health", "/grpc.reflection")) for method in methods)


async def test_server_span_has_the_callers_parent(served: Running) -> None:
    traceparent = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
    await _echo(served.channel, b"traced", metadata=(("traceparent", traceparent),))
    (span,) = served.spans()
    assert span.name == ECHO.lstrip("/")
    assert span.kind is SpanKind.SERVER
    assert format_trace_id(span.context.trace_id) == TRACE_ID
    assert span.parent is not None
    assert span.parent.is_remote
    assert format_span_id(span.parent.span_id) == PARENT_SPAN_ID
    assert span.attributes is not None
    assert span.attributes["rpc.method"] == ECHO
    assert span.attributes["rpc.grpc.status_code"] == "OK"
    assert span.status.status_code is not StatusCode.ERROR


async def test_failed_call_span_is_an_error_and_untraced_caller_gets_a_root_span(served: Running) -> None:
    await _error_of(_echo(served.channel, b"invalid"))
    await _eventually(lambda: len(served.spans()) >= 1)
    (span,) = served.spans()
    assert span.parent is None
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == "INVALID_ARGUMENT"
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "field x: expected y"


async def test_client_channel_propagates_its_span_to_the_server(served: Running) -> None:
    channel = served.app.client_channel(served.app.address)
    try:
        await _echo(channel, b"hop")
    finally:
        await channel.close()
    spans = {span.kind: span for span in served.spans()}
    client, server = spans[SpanKind.CLIENT], spans[SpanKind.SERVER]
    assert server.context.trace_id == client.context.trace_id
    assert server.parent is not None
    assert server.parent.span_id == client.context.span_id


async def test_message_bigger_than_4_mib_is_accepted_both_ways(served: Running) -> None:
    payload = b"q" * SIX_MIB
    assert await _echo(served.channel, payload) == b"echo:" + b"q" * 16 + b":" + str(SIX_MIB).encode()
    # The service's own channels take big answers too (a plain channel stops at 4 MiB).
    channel = served.app.client_channel(served.app.address)
    try:
        assert len(await _echo(channel, b"big")) == SIX_MIB
    finally:
        await channel.close()
    err = await _error_of(_echo(served.channel, b"big"))
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_message_over_the_configured_limit_is_rejected() -> None:
    app = ServiceApp("probe", _settings(max_message_bytes=1024 * 1024), [SERVICE])
    _add_probe(app, Probe())
    await app.start()
    try:
        async with aio.insecure_channel(app.address) as channel:
            err = await _error_of(_echo(channel, b"q" * (2 * 1024 * 1024)))
        assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await app.stop(grace=0)


async def test_stop_runs_drain_hooks_first_and_lets_an_in_flight_call_finish() -> None:
    app = ServiceApp("probe", _settings(), [SERVICE])
    probe = Probe()
    _add_probe(app, probe)
    stopped: list[str] = []

    async def on_drain() -> None:
        stopped.append("draining while in flight" if not probe.slow_finished else "drained too late")

    async def on_stop() -> None:
        stopped.append("finished" if probe.slow_finished else "too early")

    app.on_drain(on_drain)
    app.on_stop(on_stop)
    await app.start()
    await app.set_serving(True)
    async with aio.insecure_channel(app.address) as channel:
        slow = asyncio.ensure_future(_echo(channel, b"slow"))
        await asyncio.wait_for(probe.slow_started.wait(), 5)
        await app.stop(grace=5)
        assert await slow == b"slow done"
        assert probe.slow_finished
        assert stopped == ["draining while in flight", "finished"]
        err = await _error_of(_echo(channel, b"after", wait_for_ready=False))
        assert err.code() is grpc.StatusCode.UNAVAILABLE
    status = await app.health.Check(health_pb2.HealthCheckRequest(service=SERVICE), None)  # type: ignore[arg-type]
    assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_stop_cancels_calls_that_outlast_the_grace_period() -> None:
    app = ServiceApp("probe", _settings(), [SERVICE])
    probe = Probe()
    _add_probe(app, probe)
    await app.start()
    async with aio.insecure_channel(app.address) as channel:
        slow = asyncio.ensure_future(_echo(channel, b"slow"))
        await asyncio.wait_for(probe.slow_started.wait(), 5)
        await app.stop(grace=0.05)
        err = await _error_of(slow)
    assert err.code() is not grpc.StatusCode.OK
    assert not probe.slow_finished


async def test_metrics_endpoint_of_the_app_serves_its_registry(capsys: pytest.CaptureFixture[str]) -> None:
    app = ServiceApp("probe", _settings(metrics_port=0), [SERVICE])
    _add_probe(app, Probe())
    await app.start()
    try:
        async with aio.insecure_channel(app.address) as channel:
            await _echo(channel, b"x")
        assert app.metrics_endpoint is not None
        port = app.metrics_endpoint.port
        app.announce()
        assert capsys.readouterr().out == f"probe listening on {app.address} metrics=http://127.0.0.1:{port}/metrics\n"

        def fetch() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                return str(response.read().decode())

        body = await asyncio.to_thread(fetch)
        assert f'fresco_rpc_requests_total{{code="OK",method="{ECHO}",service="probe"}} 1.0' in body
    finally:
        await app.stop(grace=0)
