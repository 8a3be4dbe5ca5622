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


def _encode(prediction: Prediction, request: pb.PredictRequest, trace_id: str) -> pb.PredictResponse:
    return pb.PredictResponse(
        outputs=prediction.outputs,
        model=prediction.model,
        model_version=prediction.model_version,
        experiment_arm=prediction.experiment_arm,
        trace_id=trace_id,
        fallback=prediction.fallback,
        fallback_reason=prediction.fallback_reason,
        request_id=request.request_id,
        imputed_features=prediction.imputed_features,
        degraded=prediction.degraded,
    )


def _decode_one(data: bytes, limits: Limits) -> tuple[pb.PredictRequest, list[Query]]:
    request = parse_request(data, limits)
    return request, decode_queries([request], ["request"], limits)


def _decode_batch(data: bytes, limits: Limits) -> tuple[list[pb.PredictRequest], list[Query]]:
    requests = parse_batch(data, limits)
    return requests, decode_queries(requests, [f"requests[{i}]" for i in range(len(requests))], limits)


def _encode_batch(predictions: Sequence[Prediction], requests: Sequence[pb.PredictRequest], trace_id: str) -> bytes:
    responses = [_encode(p, r, trace_id) for p, r in zip(predictions, requests, strict=True)]
    return pb.PredictBatchResponse(responses=responses).SerializeToString()


class GatewayServicer:
    """fresco.gateway.v1.GatewayService over a `PredictionPipeline`, on wire bytes (see `handlers`)."""

    def __init__(self, pipeline: PredictionPipeline) -> None:
        self.pipeline = pipeline

    async def Predict(self, data: bytes, context: Context) -> pb.PredictResponse:
        budget = Budget(context.time_remaining())  # first: decoding spends the caller's budget too
        offload, limits = self.pipeline.offload, self.pipeline.limits
        request, queries = await offload.run(len(data), _decode_one, data, limits)
        (prediction,) = await self.pipeline.predict(queries, budget)
        return _encode(prediction, request, trace_id_of(trace.get_current_span()))

    async def PredictBatch(self, data: bytes, context: Context) -> bytes:
        budget = Budget(context.time_remaining())
        offload, limits = self.pipeline.offload, self.pipeline.limits
        requests, queries = await offload.run(len(data), _decode_batch, data, limits)
        predictions = await self.pipeline.predict(queries, budget)
        trace_id = trace_id_of(trace.get_current_span())
        return await offload.run(len(data), _encode_batch, predictions, requests, trace_id)

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
