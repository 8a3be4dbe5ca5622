"""Calls served while no span is recorded get a cheap non-recording span that still carries the trace."""

from __future__ import annotations

from opentelemetry.trace import format_trace_id

from chassis.tracing import unsampled_span

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def test_span_joins_the_callers_trace_and_is_not_recorded() -> None:
    span = unsampled_span([("user-agent", "x"), ("traceparent", f"00-{TRACE_ID}-{PARENT}-01")])
    context = span.get_span_context()
    assert not span.is_recording()
    assert format_trace_id(context.trace_id) == TRACE_ID
    assert context.is_valid
    assert not context.trace_flags.sampled
    assert f"{context.span_id:016x}" != PARENT


def test_span_without_caller_trace_starts_a_new_valid_trace() -> None:
    first, second = unsampled_span([]), unsampled_span(None)
    assert first.get_span_context().is_valid
    assert second.get_span_context().is_valid
    assert first.get_span_context().trace_id != second.get_span_context().trace_id


def test_malformed_traceparent_starts_a_new_trace() -> None:
    span = unsampled_span([("traceparent", "garbage")])
    assert span.get_span_context().is_valid
