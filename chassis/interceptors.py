"""gRPC interceptors: the server ones trace, count and map domain errors for every traced RPC, and
check bearer tokens and roles; the client ones carry the caller's trace context to the next hop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, cast

import grpc
from grpc import aio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from chassis.auth import OPEN_PREFIXES, AccessPolicy, Authenticator, bearer_token, enter_call, leave_call
from chassis.errors import FrescoError, PermissionDenied, Unauthenticated
from chassis.metrics import MethodMetrics, RpcMetrics
from chassis.status import status_for
from chassis.tracing import extract_context, inject_context, is_traced, unsampled_span

log = logging.getLogger(__name__)


class _Rpc:
    """What one server call records: its span, its timer and its final code."""

    __slots__ = ("context", "method", "metrics", "span", "start", "token")

    def __init__(
        self,
        method: str,
        tracer: Tracer,
        metrics: MethodMetrics,
        ctx: aio.ServicerContext[Any, Any],
        sampled: Callable[[], bool],
    ) -> None:
        self.method = method
        self.metrics = metrics
        self.context = ctx
        metadata = ctx.invocation_metadata()
        if sampled():
            self.span = tracer.start_span(
                method.lstrip("/"),
                context=extract_context(metadata),
                kind=SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.method": method},
            )
        else:
            # What the tracer would make when nothing records spans, at a third of its cost.
            self.span = unsampled_span(metadata)
        self.token = otel_context.attach(trace.set_span_in_context(self.span))
        self.start = time.perf_counter()
        metrics.in_flight.inc()

    async def fail(self, exc: BaseException) -> None:
        """Turn a domain error into its status; let gRPC's own aborts through; report the rest."""
        if isinstance(exc, FrescoError):
            await self.context.abort(status_for(exc), str(exc))
        if isinstance(exc, (aio.AbortError, aio.UsageError, asyncio.CancelledError)) or self.context.code() not in (
            None,
            grpc.StatusCode.OK,
        ):
            raise exc
        log.exception("unhandled error in %s", self.method)
        await self.context.abort(grpc.StatusCode.INTERNAL, f"internal error in {self.method}")

    async def __aenter__(self) -> _Rpc:
        return self

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        try:
            if exc is not None:
                await self.fail(exc)
        finally:
            self.finish(exc)

    def finish(self, exc: BaseException | None) -> None:
        code = self.context.code()
        if code is None:
            code = (
                grpc.StatusCode.UNKNOWN
                if exc is not None and not isinstance(exc, aio.AbortError)
                else grpc.StatusCode.OK
            )
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        self.span.set_attribute("rpc.grpc.status_code", name)
        if name != "OK":
            details = str(self.context.details() or name)
            self.span.set_status(Status(StatusCode.ERROR, details))
            # Logged inside the span, so the line carries the trace id that ties it to the request.
            log.info("%s failed: %s %s", self.method, name, details, extra={"rpc_method": self.method, "code": name})
        self.span.end()
        otel_context.detach(self.token)
        self.metrics.in_flight.dec()
        self.metrics.observe(name, time.perf_counter() - self.start)


class _WrappingInterceptor(aio.ServerInterceptor):
    """Runs the calls of the methods it `_applies` to inside a wrapper; a method's wrapped handler is
    built once, since grpc asks on every call.

    `ServiceApp` applies it where handlers are registered (`wrap_registrations`), not as a grpc
    interceptor: grpc runs an interceptor's coroutine on every call, a registered wrapper costs nothing
    per call. Used as a grpc interceptor it behaves the same."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler: Any = await continuation(handler_call_details)
        return self.wrap(handler, handler_call_details.method)

    def wrap(self, handler: Any, method: str) -> grpc.RpcMethodHandler[Any, Any] | None:
        """`handler` of `method` run inside this wrapper (as it is when the wrapper does not apply)."""
        if handler is None or not self._applies(method):
            return cast("grpc.RpcMethodHandler[Any, Any] | None", handler)
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _applies(self, method: str) -> bool:
        raise NotImplementedError

    def _wrap(self, handler: Any, method: str) -> grpc.RpcMethodHandler[Any, Any]:
        raise NotImplementedError


class ServerInterceptor(_WrappingInterceptor):
    """Tracing, metrics and error mapping for every RPC but health and reflection."""

    def __init__(self, tracer: Tracer, metrics: RpcMetrics, sampled: Callable[[], bool] = lambda: True) -> None:
        """`sampled` says whether spans are recorded at all now (see `ExportedTracerProvider.listening`):
        when not, calls get a non-recording span without going through the tracer."""
        super().__init__()
        self._tracer = tracer
        self._metrics = metrics
        self._sampled = sampled

    def _applies(self, method: str) -> bool:
        return is_traced(method)

    def _wrap(self, handler: Any, method: str) -> grpc.RpcMethodHandler[Any, Any]:
        tracer, metrics, sampled = self._tracer, self._metrics.for_method(method), self._sampled
        return wrap_handler(handler, lambda ctx: _Rpc(method, tracer, metrics, ctx, sampled))


class _WrappedGenericHandler(grpc.GenericRpcHandler):
    """A generic handler whose method handlers come out wrapped, outermost wrapper first."""

    def __init__(self, inner: grpc.GenericRpcHandler, wrappers: Sequence[_WrappingInterceptor]) -> None:
        self._inner = inner
        self._wrappers = list(reversed(wrappers))

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler: Any = self._inner.service(handler_call_details)
        method: str = handler_call_details.method
        for wrapper in self._wrappers:
            handler = wrapper.wrap(handler, method)
        return cast("grpc.RpcMethodHandler[Any, Any] | None", handler)


def wrap_registrations(server: aio.Server, wrappers: Sequence[_WrappingInterceptor]) -> None:
    """Make every handler registered on `server` from now on run inside `wrappers` (the first one
    outermost), as grpc interceptors in that order would, without their per-call coroutines."""
    add_generic = server.add_generic_rpc_handlers
    add_registered = server.add_registered_method_handlers

    def add_generic_rpc_handlers(handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        add_generic([_WrappedGenericHandler(handler, wrappers) for handler in handlers])

    def add_registered_method_handlers(service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]) -> None:
        generic = _WrappedGenericHandler(grpc.method_handlers_generic_handler(service, dict(handlers)), wrappers)
        wrapped = {}
        for name in handlers:
            handler = generic.service(_CallDetails(f"/{service}/{name}"))
            assert handler is not None
            wrapped[name] = handler
        add_registered(service, wrapped)

    server.add_generic_rpc_handlers = add_generic_rpc_handlers  # type: ignore[method-assign,assignment]
    server.add_registered_method_handlers = add_registered_method_handlers  # type: ignore[method-assign,assignment]


class _CallDetails(grpc.HandlerCallDetails):
    """The method name, all a wrapper reads of a call's details."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def wrap_handler(
    handler: Any, around: Callable[[aio.ServicerContext[Any, Any]], AbstractAsyncContextManager[Any]]
) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` with each call (of any of the four kinds) run inside `around(context)`."""
    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, ctx: aio.ServicerContext[Any, Any]) -> Any:
            async with around(ctx):
                return await inner_uu(request, ctx)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **codec)
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, ctx: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            async with around(ctx):
                async for item in inner_us(request, ctx):
                    yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, **codec)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], ctx: aio.ServicerContext[Any, Any]) -> Any:
            async with around(ctx):
                return await inner_su(requests, ctx)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **codec)
    inner_ss = handler.stream_stream

    async def stream_stream(requests: AsyncIterator[Any], ctx: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        async with around(ctx):
            async for item in inner_ss(requests, ctx):
                yield item

    return grpc.stream_stream_rpc_method_handler(stream_stream, **codec)


class AuthInterceptor(_WrappingInterceptor):
    """Verifies the bearer token of every call but health checks, refuses calls whose method needs a
    role the caller lacks, and makes the caller's identity current (`chassis.auth.current_identity`)."""

    def __init__(self, authenticator: Authenticator, policy: AccessPolicy) -> None:
        super().__init__()
        self._authenticator = authenticator
        self._policy = policy

    def _applies(self, method: str) -> bool:
        return not method.startswith(OPEN_PREFIXES)

    def _wrap(self, handler: Any, method: str) -> grpc.RpcMethodHandler[Any, Any]:
        return wrap_handler(handler, lambda ctx: self._guard(method, ctx))

    @contextlib.asynccontextmanager
    async def _guard(self, method: str, ctx: aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
        try:
            token = bearer_token(ctx.invocation_metadata())
            identity = self._authenticator.authenticate(token) if token is not None else None
            self._policy.check(method, identity)
        except (Unauthenticated, PermissionDenied) as err:
            # Aborted here, not raised: health and reflection calls have no tracing wrapper to map errors.
            await ctx.abort(status_for(err), str(err))
        entered = enter_call(identity, token)
        try:
            yield
        finally:
            # A stream closed from another context (garbage collection) cannot reset; nothing reads it there.
            with contextlib.suppress(ValueError):
                leave_call(entered)


def _with_trace_context(details: aio.ClientCallDetails, tracer: Tracer) -> tuple[aio.ClientCallDetails, trace.Span]:
    method = details.method.decode() if isinstance(details.method, bytes) else details.method
    span = tracer.start_span(
        method.lstrip("/"),
        kind=SpanKind.CLIENT,
        attributes={"rpc.system": "grpc", "rpc.method": method},
    )
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        metadata = aio.Metadata(*(tuple(details.metadata) if details.metadata else ()))
        for key, value in inject_context().items():
            metadata.add(key, value)
    finally:
        otel_context.detach(token)
    return (
        aio.ClientCallDetails(
            method=details.method,
            timeout=details.timeout,
            metadata=metadata,
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
        ),
        span,
    )


def _end(span: trace.Span, code: grpc.StatusCode) -> None:
    span.set_attribute("rpc.grpc.status_code", code.name)
    if code != grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


class ClientUnaryInterceptor(aio.UnaryUnaryClientInterceptor):
    """A client span per unary call, its context sent as W3C traceparent metadata."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        details, span = _with_trace_context(client_call_details, self._tracer)
        call = await continuation(details, request)
        try:
            await call
        except aio.AioRpcError as err:
            _end(span, err.code())
            raise
        _end(span, grpc.StatusCode.OK)
        return call


class ClientStreamInterceptor(aio.UnaryStreamClientInterceptor, aio.StreamUnaryClientInterceptor):
    """Trace-context propagation for streaming calls (the span covers call set-up)."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        details, span = _with_trace_context(client_call_details, self._tracer)
        call = await continuation(details, request)
        _end(span, grpc.StatusCode.OK)
        return call

    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: aio.ClientCallDetails, request_iterator: Any
    ) -> Any:
        details, span = _with_trace_context(client_call_details, self._tracer)
        call = await continuation(details, request_iterator)
        _end(span, grpc.StatusCode.OK)
        return call


def client_interceptors(tracer: Tracer) -> list[aio.ClientInterceptor]:
    """The interceptors every outgoing channel of a Fresco service uses."""
    return [ClientUnaryInterceptor(tracer), ClientStreamInterceptor(tracer)]
