"""The gateway servicer: decode the request, run the prediction pipeline, encode the answer.

Requests arrive as wire bytes and are parsed here, size-checked first and off the event loop when
large (`gateway.wire`); a PredictBatch answer is handed to gRPC as bytes, serialised once, off the
loop when large."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import grpc
from grpc import aio
from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from chassis.auth import method_roles
from chassis.tracing import trace_id_of
from fresco.api.gateway.v1 import gateway_pb2 as pb
from gateway.budget import Budget
from gateway.limits import Limits
from gateway.pipeline import Prediction, PredictionPipeline, Query, decode_queries
from gateway.wire import parse_batch, parse_request

Context: TypeAlias = aio.ServicerContext[Any, Any]
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GatewayService"].full_name
# Predictions are reads: open, or viewer when reads require auth.
METHOD_ROLES = method_roles(
    pb.DESCRIPTOR.services_by_name["GatewayService"], writes={}, reads=["Predict", "PredictBatch"]
)


def _encode(prediction: Prediction, trace_id: str) -> pb.PredictResponse:
    arms = [
        pb.ExperimentArm(
            experiment_key=r.assigned.experiment_key,
            phase=r.assigned.phase,
            arm=r.assigned.arm_name,
            parameters=r.assigned.parameters,
            exposed=r.exposed,
        )
        for r in prediction.experiments
    ]
    return pb.PredictResponse(
        outputs=prediction.outputs,
        model=prediction.model,
        model_version=prediction.model_version,
        experiment_arm=arms[0].arm if arms else "",
        experiments=arms,
        trace_id=trace_id,
        fallback=prediction.fallback,
        fallback_reason=prediction.fallback_reason,
        request_id=prediction.request_id,
        imputed_features=prediction.imputed_features,
        degraded=prediction.degraded,
    )


def annotate(span: trace.Span, predictions: Sequence[Prediction]) -> None:
    """The experiment arms of a call on its span: the first as attributes, every distinct one as an event."""
    if not span.is_recording():
        return
    seen: set[tuple[str, int, str, bool]] = set()
    for prediction in predictions:
        for result in prediction.experiments:
            a = result.assigned
            identity = (a.experiment_key, a.phase, a.arm_name, result.exposed)
            if identity in seen:
                continue
            attributes: dict[str, AttributeValue] = {
                "fresco.experiment.key": a.experiment_key,
                "fresco.experiment.arm": a.arm_name,
                "fresco.experiment.phase": a.phase,
                "fresco.experiment.exposed": result.exposed,
            }
            if not seen:
                span.set_attributes(attributes)
            seen.add(identity)
            span.add_event("fresco.experiment", attributes)


def _decode_one(data: bytes, limits: Limits) -> list[Query]:
    return decode_queries([parse_request(data, limits)], ["request"], limits)


def _decode_batch(data: bytes, limits: Limits) -> list[Query]:
    requests = parse_batch(data, limits)
    return decode_queries(requests, [f"requests[{i}]" for i in range(len(requests))], limits)


def _encode_batch(predictions: Sequence[Prediction], trace_id: str) -> bytes:
    responses = [_encode(p, trace_id) for p in predictions]
    return pb.PredictBatchResponse(responses=responses).SerializeToString()


class GatewayServicer:
    """fresco.gateway.v1.GatewayService over a `PredictionPipeline`, on wire bytes (see `handlers`)."""

    def __init__(self, pipeline: PredictionPipeline) -> None:
        self.pipeline = pipeline

    async def Predict(self, data: bytes, context: Context) -> pb.PredictResponse:
        budget = Budget(context.time_remaining())  # first: decoding spends the caller's budget too
        offload, limits = self.pipeline.offload, self.pipeline.limits
        queries = await offload.run(len(data), _decode_one, data, limits)
        (prediction,) = await self.pipeline.predict(queries, budget)
        span = trace.get_current_span()
        annotate(span, (prediction,))
        return _encode(prediction, trace_id_of(span))

    async def PredictBatch(self, data: bytes, context: Context) -> bytes:
        budget = Budget(context.time_remaining())
        offload, limits = self.pipeline.offload, self.pipeline.limits
        queries = await offload.run(len(data), _decode_batch, data, limits)
        predictions = await self.pipeline.predict(queries, budget)
        span = trace.get_current_span()
        annotate(span, predictions)
        trace_id = trace_id_of(span)
        return await offload.run(len(data), _encode_batch, predictions, trace_id)

    def handlers(self) -> grpc.GenericRpcHandler:
        """The service's methods for `server.add_generic_rpc_handlers`: requests are left as bytes."""
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Predict": grpc.unary_unary_rpc_method_handler(
                    self.Predict, response_serializer=pb.PredictResponse.SerializeToString
                ),
                "PredictBatch": grpc.unary_unary_rpc_method_handler(self.PredictBatch),
            },
        )
