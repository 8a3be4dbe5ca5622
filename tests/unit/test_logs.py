"""Structured log lines carry the active trace context."""

from __future__ import annotations

import json
import logging
import sys

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import format_span_id, format_trace_id

from chassis.logs import JsonFormatter, TextFormatter, configure_logging

TRACER = TracerProvider().get_tracer("unit-tests")


def _record(msg: str = "loaded %s", *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("predictor.models", logging.WARNING, __file__, 1, msg, args or ("demo",), None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_line_without_span_has_no_trace_ids() -> None:
    entry = json.loads(JsonFormatter("predictor").format(_record()))
    assert entry["service"] == "predictor"
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "predictor.models"
    assert entry["msg"] == "loaded demo"
    assert entry["ts"].endswith("Z")
    assert "trace_id" not in entry
    assert "span_id" not in entry


def test_json_line_inside_span_carries_its_ids() -> None:
    with TRACER.start_as_current_span("work") as span:
        line = JsonFormatter("predictor").format(_record())
        ctx = span.get_span_context()
    entry = json.loads(line)
    assert entry["trace_id"] == format_trace_id(ctx.trace_id)
    assert entry["span_id"] == format_span_id(ctx.span_id)
    assert len(entry["trace_id"]) == 32
    assert len(entry["span_id"]) == 16
    # Once the span ends, lines stop carrying it.
    assert "trace_id" not in json.loads(JsonFormatter("predictor").format(_record()))


def test_json_line_carries_extra_fields_and_exception() -> None:
    try:
        raise ValueError("bad thing")
    except ValueError:
        exc_info = sys.exc_info()
    record = _record("model %s failed", "demo", model="demo", version=3, path=object())
    record.exc_info = exc_info
    entry = json.loads(JsonFormatter("predictor").format(record))
    assert entry["model"] == "demo"
    assert entry["version"] == 3
    assert entry["path"].startswith("<object object")  # non-JSON values are stringified, not fatal
    assert "ValueError: bad thing" in entry["exc"]
    assert entry["msg"] == "model demo failed"


def test_text_line_carries_trace_id_only_inside_span() -> None:
    formatter = TextFormatter("gateway")
    outside = formatter.format(_record())
    assert "trace_id" not in outside
    assert "WARNING gateway predictor.models: loaded demo" in outside
    with TRACER.start_as_current_span("work") as span:
        inside = formatter.format(_record())
    assert inside.endswith(f"trace_id={format_trace_id(span.get_span_context().trace_id)}")


def test_configure_logging_installs_one_formatter() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        configure_logging("gateway", "debug", "json")
        assert len(root.handlers) == 1
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
        assert root.level == logging.DEBUG
        configure_logging("gateway", "WARNING", "text")
        assert isinstance(root.handlers[0].formatter, TextFormatter)
        assert root.level == logging.WARNING
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
