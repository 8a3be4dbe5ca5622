"""The Open Inference Protocol servicer: decode, call the model store, encode."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from typing import Any, TypeAlias

from grpc import aio

from chassis.auth import Role, method_roles
from chassis.errors import FailedPrecondition, FrescoError, InvalidArgument, NotFound, Unavailable
from fresco.api.inference import grpc_service_pb2 as pb
from fresco.api.inference import grpc_service_pb2_grpc as pb_grpc
from predictor.codec import (
    DEFAULT_MAX_BYTES_ELEMENTS,
    decode_cost,
    decode_inputs,
    encode_cost,
    encode_response,
    requested_outputs,
)
from predictor.coordinator import Coordinator
from predictor.models import ModelStore, ModelVersion, State
from predictor.peers import Peers, forwarded, merge_statistics
from predictor.stats import Duration
from predictor.stream import in_order
from predictor.triton import triton_config

log = logging.getLogger(__name__)

SERVER_NAME = "fresco-predictor"
SERVER_VERSION = "0.1.0"
# perf_analyzer reads server-side statistics only from servers announcing "statistics";
# "model_repository" covers RepositoryModelLoad's `config` and `file:` parameters.
EXTENSIONS = ["model_repository", "model_configuration", "statistics"]
# Requests of one ModelStreamInfer stream in flight at once, so that they batch, and the bytes they
# may hold: no further request is read while those in flight hold more.
STREAM_WINDOW = 32
STREAM_BYTES = 64 * 1024 * 1024
# Requests whose decoding (or answers whose encoding) walks more than this many bytes or elements
# one by one go to a thread, so that the event loop keeps serving small calls meanwhile.
OFFLOAD_ABOVE = 64 * 1024
Context: TypeAlias = aio.ServicerContext[Any, Any]
# The role each method needs once auth is on. Loading and unloading change what is served: deployer,
# the role a model manager or CI holds (admin includes it). Liveness and readiness are probes: open.
METHOD_ROLES = method_roles(
    pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
    writes={"RepositoryModelLoad": Role.DEPLOYER, "RepositoryModelUnload": Role.DEPLOYER},
    reads=[
        "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer", "ModelStreamInfer",
        "ModelConfig", "ModelStatistics", "RepositoryIndex",
    ],
    open_methods=["ServerLive", "ServerReady"],
)  # fmt: skip


def _duration(source: Duration, target: pb.StatisticDuration) -> None:
    target.count, target.ns = source.count, source.ns


def statistics_message(version: ModelVersion) -> pb.ModelStatistics:
    """A version's statistics in the protocol's form."""
    stats = version.stats
    message = pb.ModelStatistics(
        name=version.name,
        version=str(version.version),
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
    )
    for phase in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
        _duration(getattr(stats, phase), getattr(message.inference_stats, phase))
    for size, figures in sorted(stats.batches.items()):
        batch = message.batch_stats.add(batch_size=size)
        for phase in ("compute_input", "compute_infer", "compute_output"):
            _duration(getattr(figures, phase), getattr(batch, phase))
    if version.session is not None:
        gpu = version.session.platform == "tensorrt_plan"
        message.memory_usage.add(type="GPU" if gpu else "CPU", id=0, byte_size=version.session.memory_bytes())
    return message


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over a `ModelStore`."""

    def __init__(
        self,
        store: ModelStore,
        peers: Peers | None = None,
        *,
        control_mode: str = "explicit",
        max_bytes_elements: int = DEFAULT_MAX_BYTES_ELEMENTS,
        codec_executor: Executor | None = None,
    ) -> None:
        self.store = store
        self.peers = peers
        self.coordinator = Coordinator(store, peers)
        self.control_mode = control_mode
        self.max_bytes_elements = max_bytes_elements
        self.codec_executor = codec_executor or store.executor
        self.started = False

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        ready = self.started and all(m.state is State.READY for m in self.store.models.values())
        return pb.ServerReadyResponse(ready=ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        try:
            version = self.store.get(request.name, request.version)
        except (Unavailable, NotFound):
            return pb.ModelReadyResponse(ready=False)  # as Triton: unknown, unloaded, loading or failed
        return pb.ModelReadyResponse(ready=version.state is State.READY)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME,
            version=SERVER_VERSION,
            extensions=EXTENSIONS,
        )

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        version = self.store.get(request.name, request.version)
        model = self.store.model(request.name)
        response = pb.ModelMetadataResponse(
            name=request.name,
            versions=[str(v) for v in sorted(model.versions)],
            platform=version.session.platform if version.session else "",
        )
        # The version these tensors belong to (the default one when none was asked for), so a
        # gateway can pin its requests to the version whose signature it builds them from.
        response.parameters["version"].string_param = str(version.version)
        for spec in version.inputs:
            tensor = response.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
            if spec.features:
                tensor.parameters["feature_names"].string_param = ",".join(spec.features)
        for spec in version.outputs:
            response.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        return response

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        return await self._infer(request, context.time_remaining())

    async def _infer(self, request: pb.ModelInferRequest, time_remaining: float | None) -> pb.ModelInferResponse:
        if not request.model_name:
            raise InvalidArgument("model_name: expected a model name, got an empty string")
        version = self.store.get(request.model_name, request.model_version)
        start = time.perf_counter_ns()
        ok = False
        loop = asyncio.get_running_loop()
        try:
            if decode_cost(request) > OFFLOAD_ABOVE:
                inputs = await loop.run_in_executor(
                    self.codec_executor, decode_inputs, request, version.inputs, self.max_bytes_elements
                )
            else:
                inputs = decode_inputs(request, version.inputs, self.max_bytes_elements)
            outputs = requested_outputs(request, version.outputs)
            deadline = None if time_remaining is None else loop.time() + time_remaining
            results = await self.store.infer(version, inputs, outputs, deadline)
            encode = (request, str(version.version), results, version.output_datatypes)
            if encode_cost(results) > OFFLOAD_ABOVE // 8:
                response = await loop.run_in_executor(self.codec_executor, encode_response, *encode)
            else:
                response = encode_response(*encode)
            ok = True
            return response
        finally:
            version.record_request(ok, time.perf_counter_ns() - start)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async def answer(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            try:
                return pb.ModelStreamInferResponse(infer_response=await self._infer(request, context.time_remaining()))
            except FrescoError as err:
                message = str(err)
            except Exception:
                log.exception("stream request %r failed", request.id)
                message = "internal error; see the predictor's log"
            # A failed request fails alone; the stream goes on, as in Triton.
            return pb.ModelStreamInferResponse(
                error_message=message, infer_response=pb.ModelInferResponse(id=request.id)
            )

        def size(request: pb.ModelInferRequest) -> int:
            return int(request.ByteSize())

        async for response in in_order(request_iterator, answer, STREAM_WINDOW, size, STREAM_BYTES):
            yield response

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        version = self.store.get(request.name, request.version)
        model = self.store.model(request.name)
        session = version.session
        if model.config is None or session is None:
            raise Unavailable(f"model {request.name!r} is not ready")
        config = triton_config(
            request.name,
            model.config,
            session.platform,
            "tensorrt" if session.platform == "tensorrt_plan" else "onnxruntime",
            version.inputs,
            version.outputs,
            version.max_batch_size,
        )
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> pb.ModelStatisticsResponse:
        if request.name:
            models = [self.store.model(request.name)]
        else:
            models = [self.store.models[name] for name in sorted(self.store.models)]
        response = pb.ModelStatisticsResponse()
        for model in models:
            versions = (
                [model.get(request.version)] if request.version else [model.versions[v] for v in sorted(model.versions)]
            )
            for version in versions:
                response.model_stats.append(statistics_message(version))
        if peers := self._siblings(context):
            response = merge_statistics([response, *await peers.broadcast("ModelStatistics", request)])
        return response

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for name in sorted(set(self.store.repository.model_names()) | set(self.store.models)):
            model = self.store.models.get(name)
            if model is None:
                if not request.ready:
                    response.models.add(name=name, state="UNAVAILABLE", reason="not loaded")
                continue
            if not model.versions and not request.ready:
                response.models.add(name=name, state=model.state.value, reason=model.reason)
            for number, version in sorted(model.versions.items()):
                if request.ready and version.state is not State.READY:
                    continue
                response.models.add(name=name, version=str(number), state=version.state.value, reason=version.reason)
        return response

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        self._check_control_mode()
        await self.coordinator.load(request, context.invocation_metadata())
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        self._check_control_mode()
        await self.coordinator.unload(request, context.invocation_metadata())
        return pb.RepositoryModelUnloadResponse()

    def _check_control_mode(self) -> None:
        if self.control_mode != "explicit":
            # Triton's wording, which its clients match on, then what to do.
            raise FailedPrecondition(
                "explicit model load / unload is not allowed if polling is enabled: this predictor runs with "
                f"--model-control-mode {self.control_mode}; start it with --model-control-mode explicit "
                "to load and unload models through the repository API"
            )

    def _siblings(self, context: Context) -> Peers | None:
        """The sibling workers this call must also reach: none when a sibling sent it."""
        return None if forwarded(context.invocation_metadata()) else self.peers
