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
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Decision, ParentBased, Sampler, SamplingResult
from opentelemetry.trace import (
    INVALID_SPAN_CONTEXT,
    NonRecordingSpan,
    Span,
    SpanContext,
    TraceFlags,
    format_trace_id,
    get_current_span,
)

from chassis.settings import ServiceSettings

# Calls that would drown real traffic in spans, metrics and logs.
UNTRACED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_ID_GENERATOR = RandomIdGenerator()


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


def unsampled_span(metadata: Iterable[tuple[str, str | bytes]] | None) -> Span:
    """The span a server call gets while no span is recorded: not recording, in the caller's trace
    when the metadata carries a W3C traceparent (else a new one), so that log lines still carry the
    trace id, as a span from a tracer that drops everything would."""
    parent = INVALID_SPAN_CONTEXT
    for key, value in metadata or ():
        if key == "traceparent" and isinstance(value, str):
            parent = get_current_span(extract_context(metadata)).get_span_context()
            break
    trace_id = parent.trace_id if parent.is_valid else _ID_GENERATOR.generate_trace_id()
    context = SpanContext(
        trace_id, _ID_GENERATOR.generate_span_id(), is_remote=False, trace_flags=TraceFlags(0),
        trace_state=parent.trace_state if parent.is_valid else None,
    )  # fmt: skip
    return NonRecordingSpan(context)


def inject_context() -> Mapping[str, str]:
    """The current trace context as gRPC metadata entries to send."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def trace_id_of(span: Span) -> str:
    """The span's trace id as 32 hex digits, or '' when it has none."""
    ctx = span.get_span_context()
    return format_trace_id(ctx.trace_id) if ctx.is_valid else ""
