"""The gateway servicer: decode the request, run the prediction pipeline, encode the answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

from grpc import aio
from opentelemetry import trace

from chassis.tracing import trace_id_of
from fresco.api.gateway.v1 import gateway_pb2 as pb
from fresco.api.gateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.budget import Budget
from gateway.pipeline import Prediction, PredictionPipeline, decode_queries

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
        imputed_features=prediction.imputed_features,
        degraded=prediction.degraded,
    )


def _encode_batch(
    predictions: Sequence[Prediction], requests: Sequence[pb.PredictRequest], trace_id: str
) -> pb.PredictBatchResponse:
    return pb.PredictBatchResponse(
        responses=[_encode(p, r, trace_id) for p, r in zip(predictions, requests, strict=True)]
    )


class GatewayServicer(pb_grpc.GatewayServiceServicer):
    """fresco.gateway.v1.GatewayService over a `PredictionPipeline`; decoding and encoding of large
    calls run off the event loop."""

    def __init__(self, pipeline: PredictionPipeline) -> None:
        self.pipeline = pipeline

    async def Predict(self, request: pb.PredictRequest, context: Context) -> pb.PredictResponse:
        budget = Budget(context.time_remaining())  # first: decoding spends the caller's budget too
        offload, limits = self.pipeline.offload, self.pipeline.limits
        queries = await offload.run(request.ByteSize(), decode_queries, [request], ["request"], limits)
        (prediction,) = await self.pipeline.predict(queries, budget)
        return _encode(prediction, request, trace_id_of(trace.get_current_span()))

    async def PredictBatch(self, request: pb.PredictBatchRequest, context: Context) -> pb.PredictBatchResponse:
        budget = Budget(context.time_remaining())
        offload, limits = self.pipeline.offload, self.pipeline.limits
        limits.check_batch(len(request.requests))
        weight = request.ByteSize()
        labels = [f"requests[{i}]" for i in range(len(request.requests))]
        queries = await offload.run(weight, decode_queries, request.requests, labels, limits)
        predictions = await self.pipeline.predict(queries, budget)
        trace_id = trace_id_of(trace.get_current_span())
        return await offload.run(weight, _encode_batch, predictions, request.requests, trace_id)
