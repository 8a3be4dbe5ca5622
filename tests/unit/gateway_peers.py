"""Scripted peers of the gateway, in process: a predictor and a feature service on real grpc.aio
servers whose answers, delays and failures a test sets, and which record what the gateway sent.
The gateway under test is the real one (`gateway.server.build_server`) on a free port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from grpc import aio

from fresco.api.common.v1 import values_pb2
from fresco.api.features.v1 import feature_service_pb2 as fpb
from fresco.api.gateway.v1 import gateway_pb2_grpc as gpb_grpc
from fresco.api.inference import grpc_service_pb2 as pb
from gateway.server import Gateway, build_server
from gateway.settings import GatewaySettings

Context = aio.ServicerContext[Any, Any]


@dataclass
class Version:
    """One version of the scripted model: the order of its feature vector, or a BYTES echo input."""

    features: tuple[str, ...] = ("a", "b")
    echo: bool = False


@dataclass
class ScriptedPredictor:
    """Model "m": each version's `y` is sum(x[i] * 10**i) over its feature vector, so the order of
    the features shows in the answer; an echo version returns its BYTES input `text` as `echo`."""

    versions: dict[str, Version] = field(default_factory=lambda: {"1": Version()})
    default: str = "1"
    answer_version: str | None = None
    fail_infer: grpc.StatusCode | None = None
    metadata_calls: list[tuple[str, float | None]] = field(default_factory=list)
    infer_calls: list[tuple[pb.ModelInferRequest, float | None]] = field(default_factory=list)
    infer_metadata: list[dict[str, str | bytes]] = field(default_factory=list)
    infer_delay_s: float = 0.0
    refuse_value: float | None = None  # a request holding this input value is INVALID_ARGUMENT

    def _version(self, requested: str) -> tuple[str, Version]:
        number = requested or self.default
        return number, self.versions[number]

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        self.metadata_calls.append((request.version, context.time_remaining()))
        if (request.version or self.default) not in self.versions:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model m has no version {request.version}")
        number, version = self._version(request.version)
        response = pb.ModelMetadataResponse(name=request.name, versions=sorted(self.versions), platform="scripted")
        response.parameters["version"].string_param = number
        if version.echo:
            response.inputs.add(name="text", datatype="BYTES", shape=[-1])
            response.outputs.add(name="echo", datatype="BYTES", shape=[-1])
            return response
        tensor = response.inputs.add(name="x", datatype="FP64", shape=[-1, len(version.features)])
        tensor.parameters["feature_names"].string_param = ",".join(version.features)
        response.outputs.add(name="y", datatype="FP64", shape=[-1])
        return response

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        self.infer_calls.append((request, context.time_remaining()))
        self.infer_metadata.append(dict(context.invocation_metadata() or ()))
        if self.fail_infer is not None:
            await context.abort(self.fail_infer, "scripted failure")
        if (request.model_version or self.default) not in self.versions:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model m has no version {request.model_version}")
        number, version = self._version(request.model_version)
        response = pb.ModelInferResponse(model_name=request.model_name, model_version=self.answer_version or number)
        tensor = request.inputs[0]
        if version.echo:
            response.outputs.add(name="echo", datatype="BYTES", shape=tensor.shape)
            response.raw_output_contents.append(request.raw_input_contents[0])
            return response
        x = np.frombuffer(request.raw_input_contents[0], dtype="<f8").reshape(tuple(tensor.shape))
        await asyncio.sleep(self.infer_delay_s)
        if self.refuse_value is not None and (x == self.refuse_value).any():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"input x: {self.refuse_value} is refused")
        y = (x * 10.0 ** np.arange(x.shape[1])).sum(axis=1)
        response.outputs.add(name="y", datatype="FP64", shape=y.shape)
        response.raw_output_contents.append(y.astype("<f8").tobytes())
        return response


@dataclass
class ScriptedFeatures:
    """A feature service answering each ref with one (value, status) for every entity."""

    answers: dict[str, tuple[float | None, int]] = field(default_factory=dict)
    degraded: bool = False
    delay_s: float = 0.0
    calls: list[tuple[fpb.GetFeaturesRequest, float | None]] = field(default_factory=list)

    async def GetFeatures(self, request: fpb.GetFeaturesRequest, context: Context) -> fpb.GetFeaturesResponse:
        self.calls.append((request, context.time_remaining()))
        await asyncio.sleep(self.delay_s)
        response = fpb.GetFeaturesResponse()
        response.metadata.feature_refs.extend(request.feature_refs)
        response.metadata.degraded = self.degraded
        for ref in request.feature_refs:
            value, status = self.answers.get(ref, (None, fpb.FEATURE_STATUS_NOT_FOUND))
            column = response.columns.add(feature_ref=ref)
            for _ in request.entity_keys:
                column.values.add().CopyFrom(
                    values_pb2.Value() if value is None else values_pb2.Value(double_value=value)
                )
                column.statuses.append(status)  # type: ignore[arg-type]
        return response


@dataclass
class World:
    """A running gateway with its scripted peers, and a stub to call it."""

    gateway: Gateway
    predictor: ScriptedPredictor
    features: ScriptedFeatures
    stub: gpb_grpc.GatewayServiceAsyncStub


def _handlers(service: str, methods: dict[str, tuple[Any, Any]]) -> grpc.GenericRpcHandler:
    """Only the methods the gateway calls, served from plain async functions."""
    return grpc.method_handlers_generic_handler(
        service,
        {
            name: grpc.unary_unary_rpc_method_handler(
                handler, request_deserializer=request.FromString, response_serializer=lambda m: m.SerializeToString()
            )
            for name, (handler, request) in methods.items()
        },
    )


@asynccontextmanager
async def running(
    predictor: ScriptedPredictor | None = None,
    features: ScriptedFeatures | None = None,
    configure: Callable[[dict[str, Any]], None] | None = None,
) -> AsyncIterator[World]:
    """The scripted peers and a gateway routed to them, all started; stopped on exit."""
    predictor = predictor or ScriptedPredictor()
    features = features or ScriptedFeatures()
    peers = aio.server()
    peers.add_generic_rpc_handlers(
        (
            _handlers(
                "inference.GRPCInferenceService",
                {
                    "ModelMetadata": (predictor.ModelMetadata, pb.ModelMetadataRequest),
                    "ModelInfer": (predictor.ModelInfer, pb.ModelInferRequest),
                },
            ),
            _handlers(
                "fresco.features.v1.FeatureService",
                {"GetFeatures": (features.GetFeatures, fpb.GetFeaturesRequest)},
            ),
        )
    )
    port = peers.add_insecure_port("127.0.0.1:0")
    await peers.start()
    options: dict[str, Any] = {
        "predictor": f"127.0.0.1:{port}",
        "feature_service": f"127.0.0.1:{port}",
        "metrics_port": -1,
    }
    if configure is not None:
        configure(options)
    gateway = build_server(GatewaySettings(**options))
    await gateway.app.start()
    channel = aio.insecure_channel(gateway.app.address, options=[("grpc.max_receive_message_length", 1 << 28)])
    try:
        yield World(gateway, predictor, features, gpb_grpc.GatewayServiceStub(channel))
    finally:
        await channel.close()
        await gateway.app.stop(0)
        await peers.stop(0)
