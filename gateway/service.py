"""The gateway servicer: decode the request, run the prediction pipeline, encode the answer."""

from __future__ import annotations

from typing import Any, TypeAlias

from grpc import aio
from opentelemetry import trace

from chassis.tracing import trace_id_of
from fresco.api.gateway.v1 import gateway_pb2 as pb
from fresco.api.gateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.pipeline import Prediction, PredictionPipeline, Query

Context: TypeAlias = aio.ServicerContext[Any, Any]


def _encode(prediction: Prediction, request: pb.PredictRequest, trace_id: str) -> pb.PredictResponse:
    return pb.PredictResponse(
        outputs=prediction.outputs,
        model=prediction.model,
        model_version=prediction.model_version,
        experiment_arm=prediction.experiment_arm,
        trace_id=trace_id,
        fallback=prediction.fallback,
        request_id=request.request_id,
    )


class GatewayServicer(pb_grpc.GatewayServiceServicer):
    """fresco.gateway.v1.GatewayService over a `PredictionPipeline`."""

    def __init__(self, pipeline: PredictionPipeline) -> None:
        self.pipeline = pipeline

    async def Predict(self, request: pb.PredictRequest, context: Context) -> pb.PredictResponse:
        (prediction,) = await self.pipeline.predict([Query.from_proto(request, "request")], context.time_remaining())
        return _encode(prediction, request, trace_id_of(trace.get_current_span()))

    async def PredictBatch(self, request: pb.PredictBatchRequest, context: Context) -> pb.PredictBatchResponse:
        queries = [Query.from_proto(r, f"requests[{i}]") for i, r in enumerate(request.requests)]
        predictions = await self.pipeline.predict(queries, context.time_remaining())
        trace_id = trace_id_of(trace.get_current_span())
        return pb.PredictBatchResponse(
            responses=[_encode(p, r, trace_id) for p, r in zip(predictions, request.requests, strict=True)]
        )
