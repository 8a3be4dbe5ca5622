"""A gateway's MetricsWindow message as the ledger's MetricWindow, every refusal naming the field."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from fresco.api.features.v1 import statistics_pb2 as spb
from fresco.api.models.v1 import routing_pb2 as rtpb
from model_manager.window_sketches import SketchDecodeError, decode_sketches
from model_manager.windows import Histogram, MetricWindow, ShadowComparison, WindowError


def _seconds(stamp: Timestamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


def _histogram(field: str, message: spb.Histogram) -> Histogram:
    try:
        return Histogram(tuple(message.bucket_bounds), tuple(message.bucket_counts))
    except WindowError as err:
        raise WindowError(f"{field}.{err}") from None


def decode_window(message: rtpb.MetricsWindow, gateway_id: str, latency_bounds: tuple[float, ...]) -> MetricWindow:
    """The window a gateway reported; WindowError naming the field when it cannot be one."""
    if not message.HasField("window_start") or not message.HasField("window_end"):
        raise WindowError("window_start: expected window_start and window_end timestamps")
    if not message.status_counts and message.request_count:
        raise WindowError("status_counts: expected the requests counted by gRPC status code name")
    if message.latency.HasField("histogram"):
        latency = _histogram("latency.histogram", message.latency.histogram)
    else:
        latency = Histogram.empty(latency_bounds)
    scores: dict[str, Histogram] = {}
    for i, score in enumerate(message.score_histograms):
        if not score.output_name:
            raise WindowError(f"score_histograms[{i}].output_name: expected the output tensor's name")
        if score.output_name in scores:
            raise WindowError(f"score_histograms[{i}].output_name: {score.output_name!r} is listed twice")
        scores[score.output_name] = _histogram(f"score_histograms[{i}].histogram", score.histogram)
    try:
        sketches = decode_sketches(message.value_sketches)
    except SketchDecodeError as err:
        raise WindowError(str(err)) from None
    shadow = None
    if message.HasField("shadow_comparison"):
        c = message.shadow_comparison
        shadow = ShadowComparison(c.compared, c.disagreed, c.abs_diff_sum, c.dropped)
    return MetricWindow(
        window_id=message.window_id,
        gateway_id=gateway_id,
        model=message.model_name,
        version=message.version,
        route_revision=message.route_revision,
        start=_seconds(message.window_start),
        end=_seconds(message.window_end),
        status_counts=dict(message.status_counts),
        latency_ms=latency,
        scores=scores,
        mirrored=message.shadow,
        shadow=shadow,
        sketches=sketches,
    )
