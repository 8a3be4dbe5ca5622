"""The gateway's calls to predictors: an unsampled call goes over a channel without client interceptors and still
carries the peer token and the request's trace context; a sampled one keeps its client span."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from fresco.api.common.v1 import values_pb2
from fresco.api.gateway.v1 import gateway_pb2 as gpb
from tests.unit.gateway_peers import ScriptedPredictor, running

REQUEST = gpb.PredictRequest(
    model="m", features={"a": values_pb2.Value(double_value=1.0), "b": values_pb2.Value(double_value=2.0)}
)


def _with_token(path: Path) -> Any:
    def configure(options: dict[str, Any]) -> None:
        options["peer_token_file"] = path

    return configure


async def test_an_unsampled_call_carries_the_peer_token_and_the_trace_context(tmp_path: Path) -> None:
    token = tmp_path / "peer.token"
    token.write_text("s3cret-peer-token\n")
    predictor = ScriptedPredictor()
    async with running(predictor, configure=_with_token(token)) as world:
        first = await world.stub.Predict(REQUEST, timeout=10)
        second = await world.stub.Predict(REQUEST, timeout=10)
        lean = world.gateway.predictors._lean_infer
    assert list(lean) == [world.gateway.settings.predictor], "unsampled calls went over the lean channel"
    assert first.outputs["y"].double_values[0] == 1.0 + 10 * 2.0
    for response, sent in zip((first, second), predictor.infer_metadata, strict=True):
        assert sent["authorization"] == "Bearer s3cret-peer-token"
        _version, trace_id, _span_id, flags = str(sent["traceparent"]).split("-")
        assert trace_id == response.trace_id, "the predictor's call is part of the caller's trace"
        assert not int(flags, 16) & 1, "not sampled: the predictor records nothing either"
    assert first.trace_id != second.trace_id


async def test_a_sampled_call_keeps_its_client_span(tmp_path: Path) -> None:
    token = tmp_path / "peer.token"
    token.write_text("s3cret-peer-token\n")
    predictor = ScriptedPredictor()
    exporter = InMemorySpanExporter()
    async with running(predictor, configure=_with_token(token)) as world:
        world.gateway.app.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        response = await world.stub.Predict(REQUEST, timeout=10)
        lean = dict(world.gateway.predictors._lean_infer)
    assert not lean, "a sampled call never takes the lean channel"
    (sent,) = predictor.infer_metadata
    assert sent["authorization"] == "Bearer s3cret-peer-token"
    spans = {(s.name, s.kind) for s in exporter.get_finished_spans()}
    assert ("inference.GRPCInferenceService/ModelInfer", SpanKind.CLIENT) in spans, spans
    client = next(s for s in exporter.get_finished_spans() if s.kind == SpanKind.CLIENT and "ModelInfer" in s.name)
    assert format(client.context.trace_id, "032x") == response.trace_id
    _, _, parent_span, flags = str(sent["traceparent"]).split("-")
    assert parent_span == format(client.context.span_id, "016x"), "the predictor's parent is the client span"
    assert int(flags, 16) & 1, "sampled"
