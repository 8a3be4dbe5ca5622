"""Which gates a promotion runs and with what limits: the request's, else the server's defaults, checked up front."""

from __future__ import annotations

import math

from google.protobuf import json_format

from chassis.errors import InvalidArgument
from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager import schema
from model_manager.gate_drift import window_of
from model_manager.metrics import METRICS

MAX_SAMPLES = 100_000
MAX_BATCH = 65_536


def parse_defaults(text: str) -> rpb.PromotionGates:
    """The server's default gates from their protobuf JSON form (settings `default_gates_json`)."""
    try:
        gates = json_format.Parse(text or "{}", rpb.PromotionGates())
    except json_format.ParseError as err:
        raise InvalidArgument(f"default_gates_json: expected PromotionGates as JSON: {err}") from err
    return validate("default_gates_json", gates)


def _metric(field: str, metric: str) -> None:
    if metric not in METRICS:
        raise InvalidArgument(f"{field}: expected one of {', '.join(METRICS)}, got {metric!r}")


def _finite(field: str, message: rpb.BacktestGate | rpb.MetricThreshold) -> None:
    for name in ("min_value", "max_value", "max_regression", "max_relative_regression"):
        if name in message.DESCRIPTOR.fields_by_name and message.HasField(name):  # type: ignore[arg-type]
            value = getattr(message, name)
            if not math.isfinite(value):
                raise InvalidArgument(f"{field}.{name}: expected a finite number, got {value}")


def _not_negative(field: str, message: rpb.BacktestGate | rpb.MetricThreshold, name: str) -> None:
    if message.HasField(name) and getattr(message, name) < 0:  # type: ignore[arg-type]
        raise InvalidArgument(f"{field}.{name}: expected 0 or more, got {getattr(message, name)}")


def _backtest(field: str, gate: rpb.BacktestGate) -> None:
    if not gate.dataset_uri:
        raise InvalidArgument(f"{field}.dataset_uri: expected the URI of a Parquet dataset, got an empty one")
    if not gate.label_column:
        raise InvalidArgument(f"{field}.label_column: expected the name of the label column, got an empty one")
    schema.sha256(f"{field}.dataset_sha256", gate.dataset_sha256, required=False)
    if gate.min_slice_rows < 0:
        raise InvalidArgument(f"{field}.min_slice_rows: expected 0 or more, got {gate.min_slice_rows}")
    if not gate.metric and not gate.thresholds:
        raise InvalidArgument(f"{field}: expected metric or thresholds; a backtest without a limit checks nothing")
    _finite(field, gate)
    if gate.metric:
        _metric(f"{field}.metric", gate.metric)
        _not_negative(field, gate, "max_regression")
    for i, threshold in enumerate(gate.thresholds):
        where = f"{field}.thresholds[{i}]"
        _metric(f"{where}.metric", threshold.metric)
        limits = ("min_value", "max_value", "max_regression", "max_relative_regression")
        if not any(threshold.HasField(name) for name in limits):  # type: ignore[arg-type]
            raise InvalidArgument(f"{where}: expected at least one of {', '.join(limits)}")
        _finite(where, threshold)
        _not_negative(where, threshold, "max_regression")
        _not_negative(where, threshold, "max_relative_regression")


def _latency(field: str, gate: rpb.LatencyGate) -> None:
    if not 0 < gate.p99_budget_ms < math.inf:
        raise InvalidArgument(f"{field}.p99_budget_ms: expected a budget above 0 ms, got {gate.p99_budget_ms}")
    for name, limit in (("sample_requests", MAX_SAMPLES), ("warmup_requests", MAX_SAMPLES), ("batch_size", MAX_BATCH)):
        value = getattr(gate, name)
        if not 0 <= value <= limit:
            raise InvalidArgument(f"{field}.{name}: expected 0 (the default) to {limit}, got {value}")


def validate(field: str, gates: rpb.PromotionGates) -> rpb.PromotionGates:
    """`gates` if every configured gate is complete and its limits make sense; INVALID_ARGUMENT naming the field."""
    if gates.HasField("backtest"):
        _backtest(f"{field}.backtest", gates.backtest)
    if gates.HasField("latency"):
        _latency(f"{field}.latency", gates.latency)
    if gates.HasField("drift"):
        try:
            window_of(gates.drift, f"{field}.drift")
        except ValueError as err:
            raise InvalidArgument(str(err)) from None
    return gates


def chosen(requested: rpb.PromotionGates | None, defaults: rpb.PromotionGates) -> rpb.PromotionGates:
    """The request's gates when it sets them, else the defaults."""
    if requested is None:
        return defaults
    return validate("gates", requested)
