"""The predictor's HTTP server: the Open Inference Protocol's REST form (KServe v2, with Triton's
binary tensor, repository, configuration and statistics extensions) on aiohttp, in the predictor's
event loop. Each route decodes its body into the gRPC request message, calls the same servicer as
gRPC, and encodes the answer; bearer tokens and roles, spans and RPC metrics are those of the gRPC
calls, and domain errors map to HTTP statuses in one table, with `{"error": "..."}` bodies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import TypeVar, cast

import grpc
from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from chassis.auth import AccessPolicy, bearer_token, enter_call, leave_call
from chassis.errors import FrescoError
from chassis.server import ServiceApp
from chassis.status import status_for
from chassis.tracing import extract_context, unsampled_span
from fresco.api.inference import grpc_service_pb2 as pb
from predictor.http_codec import (
    INFERENCE_HEADER,
    decode_infer_request,
    dumps,
    encode_infer_response,
    load_request,
    message_json,
    repository_index_request,
    unload_request,
)
from predictor.service import EXTENSIONS, METHOD_ROLES, OFFLOAD_ABOVE, Context, InferenceServicer
from predictor.settings import PredictorSettings

log = logging.getLogger(__name__)
Result = TypeVar("Result")
SERVICE = "/inference.GRPCInferenceService/"
# Extensions only the REST form has.
HTTP_EXTENSIONS = [*EXTENSIONS, "binary_tensor_data"]
# The HTTP status of each gRPC code (the mapping of google.rpc.Code); any other code is 500.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# Probes, like gRPC's health checks: neither traced nor counted, never behind a token.
_PROBES = {"ServerLive", "ServerReady"}
_JSON = "application/json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpCall:
    """The little of a gRPC call's context the servicer reads, for a call that came over HTTP: no
    metadata (an HTTP caller is never a sibling worker, and its token was checked here), and the
    deadline its `timeout` parameter sets."""

    def __init__(self, timeout_s: float | None = None) -> None:
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())


def _context(timeout_s: float | None = None) -> Context:
    return cast("Context", HttpCall(timeout_s))


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """The protocol's error body: `{"error": message}`."""
    return web.Response(status=status, body=dumps({"error": message}), content_type=_JSON, headers=headers)


def _json(document: object) -> web.Response:
    return web.Response(body=dumps(document), content_type=_JSON)


def _truth(value: bool) -> web.Response:
    """A health answer: 200 for true, 503 for false (as KServe), with no body."""
    return web.Response(status=200 if value else 503)


class InferenceRoutes:
    """The REST form's routes over an `InferenceServicer`: decode, call it, encode."""

    def __init__(self, servicer: InferenceServicer, codec_executor: Executor) -> None:
        self.servicer = servicer
        self.codec_executor = codec_executor

    async def _offload(self, work: Callable[[], Result], cost: int) -> Result:
        """Run `work` here, or on the codec thread when it walks enough bytes to hold up the loop."""
        if cost <= OFFLOAD_ABOVE:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self.codec_executor, work)

    async def live(self, request: web.Request) -> web.Response:
        return _truth((await self.servicer.ServerLive(pb.ServerLiveRequest(), _context())).live)

    async def ready(self, request: web.Request) -> web.Response:
        return _truth((await self.servicer.ServerReady(pb.ServerReadyRequest(), _context())).ready)

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        answer = await self.servicer.ModelReady(pb.ModelReadyRequest(name=name, version=version), _context())
        return _truth(answer.ready)

    async def server_metadata(self, request: web.Request) -> web.Response:
        answer = await self.servicer.ServerMetadata(pb.ServerMetadataRequest(), _context())
        return _json({**message_json(answer), "extensions": HTTP_EXTENSIONS})

    async def model_metadata(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        answer = await self.servicer.ModelMetadata(pb.ModelMetadataRequest(name=name, version=version), _context())
        return _json(message_json(answer))

    async def model_config(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        answer = await self.servicer.ModelConfig(pb.ModelConfigRequest(name=name, version=version), _context())
        return _json(message_json(answer.config))

    async def statistics(self, request: web.Request) -> web.Response:
        name, version = request.match_info.get("name", ""), request.match_info.get("version", "")
        answer = await self.servicer.ModelStatistics(pb.ModelStatisticsRequest(name=name, version=version), _context())
        return _json(message_json(answer))

    async def infer(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        body = await request.read()
        call = await self._offload(
            partial(decode_infer_request, name, version, body, request.headers.get(INFERENCE_HEADER)), len(body)
        )
        answer = await self.servicer.ModelInfer(call.request, _context(call.timeout_s))
        size = sum(len(raw) for raw in answer.raw_output_contents)
        payload, header_length = await self._offload(partial(encode_infer_response, answer, call.binary), size)
        if header_length is None:
            return web.Response(body=payload, content_type=_JSON)
        return web.Response(
            body=payload, content_type="application/octet-stream", headers={INFERENCE_HEADER: str(header_length)}
        )

    async def repository_index(self, request: web.Request) -> web.Response:
        answer = await self.servicer.RepositoryIndex(repository_index_request(await request.read()), _context())
        return _json([message_json(model) for model in answer.models])

    async def load(self, request: web.Request) -> web.Response:
        body = await request.read()
        await self.servicer.RepositoryModelLoad(load_request(request.match_info["name"], body), _context())
        return web.Response()

    async def unload(self, request: web.Request) -> web.Response:
        body = await request.read()
        await self.servicer.RepositoryModelUnload(unload_request(request.match_info["name"], body), _context())
        return web.Response()

    def table(self) -> list[tuple[str, str, str, Handler]]:
        """Every route: its method, path template, the gRPC method it is, and its handler."""
        model = "/v2/models/{name}"
        version = "/v2/models/{name}/versions/{version}"
        routes: list[tuple[str, str, str, Handler]] = [
            ("GET", "/v2/health/live", "ServerLive", self.live),
            ("GET", "/v2/health/ready", "ServerReady", self.ready),
            ("GET", "/v2", "ServerMetadata", self.server_metadata),
            # Before /v2/models/{name}, which would take "stats" for a model's name.
            ("GET", "/v2/models/stats", "ModelStatistics", self.statistics),
            ("POST", "/v2/repository/index", "RepositoryIndex", self.repository_index),
            ("POST", "/v2/repository/models/{name}/load", "RepositoryModelLoad", self.load),
            ("POST", "/v2/repository/models/{name}/unload", "RepositoryModelUnload", self.unload),
        ]
        for prefix in (model, version):
            routes += [
                ("GET", prefix, "ModelMetadata", self.model_metadata),
                ("GET", f"{prefix}/ready", "ModelReady", self.model_ready),
                ("GET", f"{prefix}/config", "ModelConfig", self.model_config),
                ("GET", f"{prefix}/stats", "ModelStatistics", self.statistics),
                ("POST", f"{prefix}/infer", "ModelInfer", self.infer),
            ]
        return routes


def _model(request: web.Request) -> tuple[str, str]:
    return request.match_info["name"], request.match_info.get("version", "")


@dataclass(frozen=True)
class _Route:
    label: str  # "POST /v2/models/{name}/infer": the metrics' method label and the span's name
    rpc: str  # the gRPC method it is, whose role it needs
    probe: bool


_TRACE_HEADERS = {"traceparent", "tracestate"}


@dataclass
class _Outcome:
    """How a call ended: the gRPC code its error maps to (so HTTP and gRPC calls count alike), and why."""

    code: str = grpc.StatusCode.INTERNAL.name
    details: str = ""


class Guard:
    """What wraps every route, as the chassis' interceptors wrap every gRPC method: the bearer token
    checked against the method's role, a server span in the caller's trace, RPC metrics, and domain
    errors turned into their HTTP status."""

    def __init__(self, app: ServiceApp, max_request_bytes: int, require_for_reads: bool) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.policy = AccessPolicy(METHOD_ROLES, require_for_reads)

    def wrap(self, method: str, path: str, rpc: str, handler: Handler) -> Handler:
        route = _Route(f"{method} {path}", SERVICE + rpc, rpc in _PROBES)

        async def guarded(request: web.Request) -> web.StreamResponse:
            if route.probe:
                return await self._answer(route, request, handler, _Outcome())
            with self._telemetry(route, request) as outcome:
                return await self._answer(route, request, handler, outcome)

        return guarded

    async def _answer(
        self, route: _Route, request: web.Request, handler: Handler, outcome: _Outcome
    ) -> web.StreamResponse:
        try:
            with self._caller(route, request):
                response = await handler(request)
        except FrescoError as err:
            code = status_for(err)
            outcome.code, outcome.details = code.name, str(err)
            headers = {"WWW-Authenticate": "Bearer"} if code == grpc.StatusCode.UNAUTHENTICATED else None
            return error_response(HTTP_STATUS.get(code, 500), str(err), headers)
        except web.HTTPRequestEntityTooLarge:
            outcome.code = grpc.StatusCode.RESOURCE_EXHAUSTED.name  # what gRPC answers a message over its limit
            return error_response(
                413,
                f"request body: larger than the limit of {self.max_request_bytes} bytes "
                "(setting http_max_request_bytes, FRESCO_PREDICTOR_HTTP_MAX_REQUEST_BYTES)",
            )
        except web.HTTPException as err:
            outcome.code = grpc.StatusCode.INVALID_ARGUMENT.name if err.status < 500 else outcome.code
            raise
        except Exception:
            log.exception("unhandled error in %s", route.label)
            return error_response(500, f"internal error in {route.label}; see the predictor's log")
        outcome.code = grpc.StatusCode.OK.name
        return response

    @contextlib.contextmanager
    def _caller(self, route: _Route, request: web.Request) -> Iterator[None]:
        """The caller's identity, checked against the route's role, current while it is served (so
        calls to sibling workers carry the caller's own token)."""
        authenticator = self.app.authenticator
        if authenticator is None:
            yield
            return
        header = request.headers.get("Authorization")
        token = bearer_token([("authorization", header)] if header is not None else None)
        identity = authenticator.authenticate(token) if token is not None else None
        self.policy.check(route.rpc, identity)  # Unauthenticated or PermissionDenied: 401 or 403
        entered = enter_call(identity, token)
        try:
            yield
        finally:
            leave_call(entered)

    @contextlib.contextmanager
    def _telemetry(self, route: _Route, request: web.Request) -> Iterator[_Outcome]:
        carrier = [(key.lower(), value) for key, value in request.headers.items() if key.lower() in _TRACE_HEADERS]
        if self.app.tracer_provider.listening:
            span = self.app.tracer.start_span(
                route.label,
                context=extract_context(carrier),
                kind=SpanKind.SERVER,
                attributes={"http.request.method": request.method, "http.route": route.label.partition(" ")[2]},
            )
        else:
            span = unsampled_span(carrier)
        token = otel_context.attach(trace.set_span_in_context(span))
        metrics = self.app.rpc_metrics.for_method(route.label)
        metrics.in_flight.inc()
        start = time.perf_counter()
        outcome = _Outcome()
        try:
            yield outcome
        finally:
            code = outcome.code
            span.set_attribute("rpc.grpc.status_code", code)
            if code != grpc.StatusCode.OK.name:
                span.set_status(Status(StatusCode.ERROR, code))
                extra = {"rpc_method": route.label, "code": code}
                log.info("%s failed: %s %s", route.label, code, outcome.details or code, extra=extra)
            span.end()
            otel_context.detach(token)
            metrics.in_flight.dec()
            metrics.observe(code, time.perf_counter() - start)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals (no such route, wrong method, a body it cannot read) in the protocol's form."""
    try:
        return await handler(request)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        headers = {"Allow": err.headers["Allow"]} if "Allow" in err.headers else None
        return error_response(err.status, f"{request.method} {request.path}: {err.reason}", headers)


def build_application(
    settings: PredictorSettings, app: ServiceApp, servicer: InferenceServicer, codec_executor: Executor
) -> web.Application:
    """The REST form's aiohttp application over the servicer, guarded as the gRPC server is."""
    application = web.Application(client_max_size=settings.http_max_request_bytes, middlewares=[_json_errors])
    guard = Guard(app, settings.http_max_request_bytes, settings.auth_require_for_reads)
    for method, path, rpc, handler in InferenceRoutes(servicer, codec_executor).table():
        application.router.add_route(method, path, guard.wrap(method, path, rpc, handler))
    return application


def _ssl_context(settings: PredictorSettings) -> ssl.SSLContext | None:
    """TLS as the gRPC port speaks it (with client certificates required when it requires them)."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    if settings.tls_client_ca_file is not None:
        context.load_verify_locations(settings.tls_client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class HttpServer:
    """The HTTP listener: bound on start (port 0 picks a free one), shared with sibling workers
    through SO_REUSEPORT, drained on stop within the grace period."""

    def __init__(self, application: web.Application, settings: PredictorSettings) -> None:
        self.settings = settings
        self.ssl_context = _ssl_context(settings)
        self._runner = web.AppRunner(
            application, access_log=None, handle_signals=False, shutdown_timeout=settings.grace_period_s
        )
        self.port = 0

    @property
    def url(self) -> str:
        """Where it listens, e.g. http://127.0.0.1:8000."""
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.settings.host}:{self.port}"

    def _socket(self) -> socket.socket:
        host, port = self.settings.host, self.settings.http_port
        listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.settings.worker_index is not None:  # the workers of --workers N share the port
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listener.bind((host, port))
            listener.listen(1024)
        except OSError:
            listener.close()
            raise
        return listener

    async def start(self) -> None:
        """Bind and serve."""
        listener = self._socket()
        self.port = int(listener.getsockname()[1])
        await self._runner.setup()
        await web.SockSite(self._runner, listener, ssl_context=self.ssl_context).start()

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish within the grace period, close."""
        await self._runner.cleanup()


__all__ = ["HTTP_STATUS", "HttpServer", "InferenceRoutes", "build_application", "error_response"]
