"""OpenTelemetry tracing: a tracer provider per service, and W3C trace-context propagation
across gRPC through metadata. The interceptors themselves live in `chassis.interceptors`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Decision, ParentBased, Sampler, SamplingResult
from opentelemetry.trace import Span, format_trace_id

from chassis.settings import ServiceSettings

# Calls that would drown real traffic in spans, metrics and logs.
UNTRACED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class ExportedTracerProvider(TracerProvider):
    """A tracer provider that records spans only once something exports them.

    Without an exporter, spans are still created (with real, propagated trace ids, which callers
    see in responses and logs) but not recorded, which is most of their cost on the hot path.
    """

    def __init__(self, resource: Resource) -> None:
        self._listening = False
        super().__init__(resource=resource, sampler=_WhenListening(self))

    def add_span_processor(self, span_processor: SpanProcessor) -> None:
        self._listening = True
        super().add_span_processor(span_processor)

    @property
    def listening(self) -> bool:
        """Whether any span processor receives spans."""
        return self._listening


class _WhenListening(Sampler):
    def __init__(self, provider: ExportedTracerProvider) -> None:
        self._provider = provider
        self._on = ParentBased(ALWAYS_ON)

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        if self._provider.listening:
            return self._on.should_sample(*args, **kwargs)
        return SamplingResult(Decision.DROP)

    def get_description(self) -> str:
        return "ParentBased(AlwaysOn) once spans are exported, else Drop"


def build_tracer_provider(settings: ServiceSettings, service_name: str) -> ExportedTracerProvider:
    """A tracer provider exporting where the settings say; call `shutdown()` on stop to flush."""
    provider = ExportedTracerProvider(Resource.create({"service.name": service_name}))
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
