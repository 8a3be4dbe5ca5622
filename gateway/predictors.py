"""Calls to predictors over the inference protocol: one channel per endpoint, each request pinned
to the model version whose signature built its tensors, tensors sent raw."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from grpc import aio
from opentelemetry import trace
from prometheus_client import CollectorRegistry

from chassis.errors import FrescoError, InvalidArgument, NotFound, Unavailable
from chassis.status import peer_error
from chassis.tensors import array_from_raw, datatype_of, raw_from_array
from fresco.api.inference import grpc_service_pb2 as pb
from fresco.api.inference import grpc_service_pb2_grpc as pb_grpc
from gateway.assembly import ModelSignature
from gateway.budget import Budget
from gateway.coalesce import DEFAULT_MAX_BYTES, Coalescer, Key
from gateway.lean_channels import LeanChannels

# Errors after which a cached signature may be the cause: the version is gone or loading, or the
# tensors no longer fit it. The gateway then re-reads the metadata before it blames the caller.
STALE_SUSPECTS = (NotFound, Unavailable, InvalidArgument)
MODEL_INFER = f"/{pb.DESCRIPTOR.services_by_name['GRPCInferenceService'].full_name}/ModelInfer"
InferCall = Callable[..., Awaitable[pb.ModelInferResponse]]


@dataclass(frozen=True)
class Pinned:
    """The version a request goes to and the signature its tensors are built from."""

    version: str
    signature: ModelSignature


def version_of(metadata: pb.ModelMetadataResponse, requested: str) -> str:
    """The version a ModelMetadata answer describes.

    Fresco's predictor names it in the "version" parameter (for an empty request, its default
    version). Another server of the protocol is taken to serve its highest version by default, as
    Triton does."""
    if "version" in metadata.parameters:
        return metadata.parameters["version"].string_param
    if requested:
        return requested
    numbers = [int(v) for v in metadata.versions if v.isascii() and v.isdigit()]
    if not numbers:
        raise Unavailable(f"model {metadata.name!r}: the predictor lists no version to pin ({list(metadata.versions)})")
    return str(max(numbers))


def infer_request(pinned: Pinned, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> pb.ModelInferRequest:
    """The ModelInfer request for the pinned version: each tensor raw, named by its feature order."""
    request = pb.ModelInferRequest(model_name=pinned.signature.name, model_version=pinned.version)
    feature_names = {spec.name: spec.feature_names for spec in pinned.signature.inputs}
    for name, array in inputs.items():
        datatype = datatype_of(array)
        tensor = request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        if feature_names.get(name):
            # The order the tensor was built in, for a predictor that checks it against its own.
            tensor.parameters["feature_names"].string_param = ",".join(feature_names[name])
        request.raw_input_contents.append(raw_from_array(array, datatype))
    for name in outputs:
        request.outputs.add(name=name)
    return request


class PredictorPool:
    """Channels to predictor endpoints, created on first use and closed together, and the pinned
    signature of each (endpoint, model, requested version): cached for `metadata_ttl_s` when the
    caller named the version, for `default_version_ttl_s` when the predictor's default answers."""

    def __init__(
        self,
        channel_factory: Callable[[str], aio.Channel],
        timeout_s: float,
        metadata_ttl_s: float,
        default_version_ttl_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        lean: LeanChannels | None = None,
        merge_in_flight: int = 0,
        merge_max_rows: int = 256,
        merge_max_bytes: int = DEFAULT_MAX_BYTES,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._channel_factory = channel_factory
        self._lean = lean
        self._lean_infer: dict[str, InferCall] = {}
        self.coalescer = (
            Coalescer(self._send_key, merge_in_flight, merge_max_rows, registry, max_bytes=merge_max_bytes)
            if merge_in_flight
            else None
        )
        self._timeout_s = timeout_s
        self._metadata_ttl_s = metadata_ttl_s
        self._default_version_ttl_s = default_version_ttl_s
        self._clock = clock
        self._stubs: dict[str, pb_grpc.GRPCInferenceServiceAsyncStub] = {}
        self._channels: list[aio.Channel] = []
        self._pinned: dict[tuple[str, str, str], tuple[float, Pinned]] = {}

    def _stub(self, endpoint: str) -> pb_grpc.GRPCInferenceServiceAsyncStub:
        stub = self._stubs.get(endpoint)
        if stub is None:
            channel = self._channel_factory(endpoint)
            self._channels.append(channel)
            stub = self._stubs[endpoint] = pb_grpc.GRPCInferenceServiceStub(channel)
        return stub

    def _infer_call(self, endpoint: str) -> tuple[InferCall, tuple[tuple[str, str], ...] | None]:
        """ModelInfer at the endpoint and the metadata to send: over the lean channel when the call's trace is
        not sampled (nothing would record its client span), else over the traced one."""
        if self._lean is None or trace.get_current_span().is_recording():
            return self._stub(endpoint).ModelInfer, None
        call = self._lean_infer.get(endpoint)
        if call is None:
            channel = self._lean.channel(endpoint)
            self._channels.append(channel)
            call = self._lean_infer[endpoint] = channel.unary_unary(
                MODEL_INFER,
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString,
            )
        return call, self._lean.metadata()

    async def pin(self, endpoint: str, model: str, version: str, budget: Budget) -> Pinned:
        """The version that will answer a request for `version` ("" for the default) and its
        signature, from cache or from one ModelMetadata answer (so the two always agree)."""
        key = (endpoint, model, version)
        cached = self._pinned.get(key)
        now = self._clock()
        ttl = self._metadata_ttl_s if version else self._default_version_ttl_s
        if cached is not None and now - cached[0] < ttl:
            return cached[1]
        what = f"predictor {endpoint}"
        try:
            metadata = await self._stub(endpoint).ModelMetadata(
                pb.ModelMetadataRequest(name=model, version=version),
                timeout=budget.for_hop(f"{what} ModelMetadata", self._timeout_s),
            )
        except aio.AioRpcError as err:
            raise peer_error(err.code(), err.details() or "", what) from None
        pinned = Pinned(version_of(metadata, version), ModelSignature.from_metadata(metadata))
        self._pinned[key] = (now, pinned)
        return pinned

    async def repin(self, endpoint: str, model: str, version: str, budget: Budget) -> Pinned:
        """`pin` from fresh metadata, the cached answer dropped."""
        self._pinned.pop((endpoint, model, version), None)
        return await self.pin(endpoint, model, version, budget)

    async def infer(
        self,
        endpoint: str,
        pinned: Pinned,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        budget: Budget,
    ) -> pb.ModelInferResponse:
        """Run inference on exactly the pinned version; an answer from any other version is refused. An
        unsampled call of a mergeable version may travel with concurrent ones (`gateway.coalesce`)."""
        model = pinned.signature.name
        what = f"predictor {endpoint}"
        timeout_s = budget.for_hop(f"{what} ModelInfer", self._timeout_s)
        if self.coalescer is not None and pinned.signature.mergeable and not trace.get_current_span().is_recording():
            rows = len(next(iter(inputs.values()))) if inputs else 0
            response = await self.coalescer.infer((endpoint, pinned, tuple(outputs)), inputs, rows, timeout_s, what)
        else:
            response = await self._send(endpoint, pinned, inputs, outputs, timeout_s)
        if response.model_version != pinned.version:
            raise Unavailable(
                f"{what} answered model {model!r} with version {response.model_version!r}, "
                f"not the version {pinned.version!r} the request was built for; the answer is discarded"
            )
        return response

    async def _send(
        self, endpoint: str, pinned: Pinned, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], timeout_s: float
    ) -> pb.ModelInferResponse:
        """One ModelInfer call; its failure as the domain error of its status."""
        request = infer_request(pinned, inputs, outputs)
        try:
            call, metadata = self._infer_call(endpoint)
            response: pb.ModelInferResponse = await call(request, timeout=timeout_s, metadata=metadata)
        except aio.AioRpcError as err:
            raise peer_error(err.code(), err.details() or "", f"predictor {endpoint}") from None
        return response

    async def _send_key(self, key: Key, inputs: Mapping[str, np.ndarray], timeout_s: float) -> pb.ModelInferResponse:
        endpoint, pinned, outputs = key
        assert isinstance(pinned, Pinned)
        return await self._send(endpoint, pinned, inputs, outputs, timeout_s)

    async def close(self) -> None:
        """Let merged calls finish, then close every channel."""
        if self.coalescer is not None:
            await self.coalescer.close()
        for channel in self._channels:
            await channel.close()


def decode_outputs(response: pb.ModelInferResponse, endpoint: str) -> dict[str, tuple[str, np.ndarray]]:
    """Each output of an inference answer: its datatype and array."""
    results: dict[str, tuple[str, np.ndarray]] = {}
    for index, tensor in enumerate(response.outputs):
        what = f"predictor {endpoint} output {tensor.name!r}"
        if index >= len(response.raw_output_contents):
            raise Unavailable(f"{what}: answer carries no raw contents")
        try:
            array = array_from_raw(response.raw_output_contents[index], tensor.datatype, tuple(tensor.shape), what)
        except FrescoError as err:  # a malformed answer is the predictor's fault, not the caller's
            raise Unavailable(str(err)) from None
        results[tensor.name] = (tensor.datatype, array)
    return results
