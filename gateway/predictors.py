"""Calls to predictors over the inference protocol: one channel per endpoint, model signatures
cached, tensors sent raw."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from grpc import StatusCode, aio

from chassis.errors import DeadlineExceeded, FrescoError, InvalidArgument, NotFound, Unavailable
from chassis.tensors import array_from_raw, datatype_of, raw_from_array
from fresco.api.inference import grpc_service_pb2 as pb
from fresco.api.inference import grpc_service_pb2_grpc as pb_grpc
from gateway.assembly import ModelSignature

# How a predictor's status maps to the gateway's: its callers' mistakes stay theirs, the rest is
# the predictor being unavailable to them.
_PASS_THROUGH: dict[StatusCode, type[FrescoError]] = {
    StatusCode.INVALID_ARGUMENT: InvalidArgument,
    StatusCode.NOT_FOUND: NotFound,
    StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def _translate(err: aio.AioRpcError, endpoint: str) -> FrescoError:
    kind = _PASS_THROUGH.get(err.code(), Unavailable)
    return kind(f"predictor {endpoint}: {err.details()}")


class PredictorPool:
    """Channels to predictor endpoints, created on first use and closed together."""

    def __init__(self, channel_factory: Callable[[str], aio.Channel], timeout_s: float, metadata_ttl_s: float) -> None:
        self._channel_factory = channel_factory
        self._timeout_s = timeout_s
        self._metadata_ttl_s = metadata_ttl_s
        self._stubs: dict[str, pb_grpc.GRPCInferenceServiceAsyncStub] = {}
        self._channels: list[aio.Channel] = []
        self._signatures: dict[tuple[str, str, str], tuple[float, ModelSignature]] = {}

    def _stub(self, endpoint: str) -> pb_grpc.GRPCInferenceServiceAsyncStub:
        stub = self._stubs.get(endpoint)
        if stub is None:
            channel = self._channel_factory(endpoint)
            self._channels.append(channel)
            stub = self._stubs[endpoint] = pb_grpc.GRPCInferenceServiceStub(channel)
        return stub

    async def signature(self, endpoint: str, model: str, version: str) -> ModelSignature:
        """The model's input/output signature, from cache or from ModelMetadata."""
        key = (endpoint, model, version)
        cached = self._signatures.get(key)
        now = time.monotonic()
        if cached is not None and now - cached[0] < self._metadata_ttl_s:
            return cached[1]
        try:
            metadata = await self._stub(endpoint).ModelMetadata(
                pb.ModelMetadataRequest(name=model, version=version), timeout=self._timeout_s
            )
        except aio.AioRpcError as err:
            raise _translate(err, endpoint) from None
        signature = ModelSignature.from_metadata(metadata)
        self._signatures[key] = (now, signature)
        return signature

    async def infer(
        self,
        endpoint: str,
        model: str,
        version: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        timeout_s: float | None,
    ) -> tuple[str, dict[str, tuple[str, np.ndarray]]]:
        """Run inference; returns the version that answered and each output's datatype and array."""
        request = pb.ModelInferRequest(model_name=model, model_version=version)
        for name, array in inputs.items():
            datatype = datatype_of(array)
            request.inputs.add(name=name, datatype=datatype, shape=array.shape)
            request.raw_input_contents.append(raw_from_array(array, datatype))
        for name in outputs:
            request.outputs.add(name=name)
        try:
            response = await self._stub(endpoint).ModelInfer(request, timeout=timeout_s or self._timeout_s)
        except aio.AioRpcError as err:
            raise _translate(err, endpoint) from None
        results: dict[str, tuple[str, np.ndarray]] = {}
        for index, tensor in enumerate(response.outputs):
            what = f"predictor {endpoint} output {tensor.name!r}"
            if index >= len(response.raw_output_contents):
                raise Unavailable(f"{what}: answer carries no raw contents")
            results[tensor.name] = (
                tensor.datatype,
                array_from_raw(response.raw_output_contents[index], tensor.datatype, tuple(tensor.shape), what),
            )
        return response.model_version, results

    async def close(self) -> None:
        """Close every channel."""
        for channel in self._channels:
            await channel.close()
