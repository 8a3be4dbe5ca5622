"""OpenTelemetry tracing: a tracer provider per service, and W3C trace-context propagation
across gRPC through metadata. The interceptors themselves live in `chassis.interceptors`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.trace import Span, format_trace_id

from chassis.settings import ServiceSettings

# Calls that would drown real traffic in spans, metrics and logs.
UNTRACED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def build_tracer_provider(settings: ServiceSettings, service_name: str) -> TracerProvider:
    """A tracer provider exporting where the settings say; call `shutdown()` on stop to flush."""
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if settings.tracing_exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint, insecure=True)
        provider.add_span_processor(BatchSpanProcessor(exporter))
    elif settings.tracing_exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    return provider


def is_traced(method: str) -> bool:
    """Whether calls to this full method name get spans, metrics and logs."""
    return not method.startswith(UNTRACED_PREFIXES)


def extract_context(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context:
    """The remote trace context carried in incoming gRPC metadata (W3C traceparent)."""
    carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
    return propagate.extract(carrier)


def inject_context() -> Mapping[str, str]:
    """The current trace context as gRPC metadata entries to send."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def trace_id_of(span: Span) -> str:
    """The span's trace id as 32 hex digits, or '' when it has none."""
    ctx = span.get_span_context()
    return format_trace_id(ctx.trace_id) if ctx.is_valid else ""
