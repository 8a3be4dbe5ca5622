"""Loading registry versions onto predictors over the Open Inference Protocol: RepositoryModelLoad carrying the
artifact inline (`file:<version>/model.onnx`) with a Triton JSON `config`, ModelReady to confirm it, and
RepositoryModelUnload to release it. Each version is its own predictor model, so versions load side by side."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc import aio

from chassis.errors import FailedPrecondition, Unavailable
from fresco.api.inference import grpc_service_pb2 as ipb
from fresco.api.inference import grpc_service_pb2_grpc as ipb_grpc
from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager.artifacts import ArtifactStore
from model_manager.registry import Registry

# The config parameters a predictor reads back to report which registry version a copy is.
MODEL_PARAMETER = "registry_model"
VERSION_PARAMETER = "registry_version"
_MAX_NAME = 128
_SERVED_FORMATS = ("onnx",)
_BACKENDS = ("onnxruntime", "tensorrt")


def predictor_model_name(model: str, version: int) -> str:
    """The predictor model a registry version is loaded as: `<model>.v<version>` (over-long names keep a prefix
    and a digest of the model's name, as predictor names hold at most 128 characters)."""
    suffix = f".v{version}"
    if len(model) + len(suffix) <= _MAX_NAME:
        return f"{model}{suffix}"
    digest = hashlib.sha256(model.encode()).hexdigest()[:16]
    return f"{model[: _MAX_NAME - len(suffix) - 17]}-{digest}{suffix}"


@dataclass(frozen=True)
class Artifact:
    """A registry version ready to ship to a predictor."""

    model: str
    version: int
    content: bytes
    expected_memory_bytes: int
    backend: str  # "" lets the predictor choose
    max_batch_size: int
    # The feature-vector input (name, datatype, shape) and the feature name of each of its positions, from the
    # version's signature, so the predictor names them and a gateway fills them by name; "" when none.
    feature_input: tuple[str, str, tuple[int, ...]] = ("", "", ())
    features: tuple[str, ...] = ()


def expected_memory(size_bytes: int, hints: rpb.BackendHints) -> int:
    """Memory one copy takes: the version's hint, else its artifact's size (what ONNX sessions report)."""
    return hints.expected_memory_bytes if hints.expected_memory_bytes > 0 else size_bytes


class RegistryArtifacts:
    """Versions and their bytes from the registry and its artifact store."""

    def __init__(self, registry: Registry, store: ArtifactStore) -> None:
        self.registry = registry
        self.store = store

    async def expected_memory(self, model: str, version: int) -> int:
        """The memory one copy of the version is expected to take; NOT_FOUND for an unknown version."""
        record = await asyncio.to_thread(self.registry.get_version, model, version)
        return expected_memory(record.size_bytes, record.backend_hints)

    async def artifact(self, model: str, version: int) -> Artifact:
        """The version with its bytes; FAILED_PRECONDITION for a format predictors do not serve."""
        record = await asyncio.to_thread(self.registry.get_version, model, version)
        if record.format not in _SERVED_FORMATS:
            raise FailedPrecondition(
                f"{model} version {version}: format {record.format!r} is not served by predictors; "
                f"expected one of {list(_SERVED_FORMATS)}"
            )
        hints = record.backend_hints
        # No hint (or one predictors do not know) lets the predictor choose.
        backend = hints.preferred_backend if hints.preferred_backend in _BACKENDS else ""
        content = await asyncio.to_thread(self.store.read, record.sha256)
        signature = record.signature
        spec = next((t for t in signature.inputs if t.name == signature.feature_input), None)
        return Artifact(
            model,
            version,
            content,
            expected_memory(record.size_bytes, hints),
            backend,
            hints.max_batch_size,
            ("", "", ()) if spec is None else (spec.name, spec.datatype, tuple(spec.shape)),
            tuple(signature.feature_refs) if spec is not None else (),
        )


def load_config(name: str, artifact: Artifact) -> str:
    """Triton's JSON config for one version: only that version, its backend, and the registry identity."""
    config: dict[str, object] = {
        "name": name,
        "version_policy": {"specific": {"versions": [artifact.version]}},
        "parameters": {
            MODEL_PARAMETER: {"string_value": artifact.model},
            VERSION_PARAMETER: {"string_value": str(artifact.version)},
        },
    }
    if artifact.backend:
        config["backend"] = artifact.backend
    if artifact.max_batch_size > 0:
        config["max_batch_size"] = artifact.max_batch_size
        config["dynamic_batching"] = {}
    name_of_input, datatype, shape = artifact.feature_input
    if name_of_input and artifact.features:
        # Triton leaves the batch dimension out of dims when the model batches.
        dims = list(shape[1:]) if artifact.max_batch_size > 0 else list(shape)
        config["input"] = [
            {"name": name_of_input, "data_type": f"TYPE_{datatype}", "dims": dims, "features": list(artifact.features)}
        ]
    return json.dumps(config)


def load_request(name: str, artifact: Artifact) -> ipb.RepositoryModelLoadRequest:
    """RepositoryModelLoad for one version: its config, and its artifact as `<version>/model.onnx`."""
    request = ipb.RepositoryModelLoadRequest(model_name=name)
    request.parameters["config"].string_param = load_config(name, artifact)
    request.parameters[f"file:{artifact.version}/model.onnx"].bytes_param = artifact.content
    return request


def _reason(err: grpc.RpcError) -> str:
    return f"{err.code().name}: {err.details()}"


class PredictorLoader:
    """Repository calls to predictors, one cached channel per address (made by `channel`, which carries the
    manager's peer TLS and bearer token)."""

    def __init__(self, channel: Callable[[str], aio.Channel], timeout_s: float) -> None:
        self._make_channel = channel
        self.timeout_s = timeout_s
        self._stubs: dict[str, tuple[aio.Channel, ipb_grpc.GRPCInferenceServiceAsyncStub]] = {}

    def _stub(self, address: str) -> ipb_grpc.GRPCInferenceServiceAsyncStub:
        if address not in self._stubs:
            channel = self._make_channel(address)
            stub: ipb_grpc.GRPCInferenceServiceAsyncStub = ipb_grpc.GRPCInferenceServiceStub(channel)
            self._stubs[address] = (channel, stub)
        return self._stubs[address][1]

    async def load(self, address: str, name: str, artifact: Artifact) -> None:
        """Load and warm the version on the predictor at `address` as `name`, and check it is ready.
        FAILED_PRECONDITION when the predictor refuses it, UNAVAILABLE when it cannot be reached."""
        stub = self._stub(address)
        try:
            await stub.RepositoryModelLoad(load_request(name, artifact), timeout=self.timeout_s)
            ready = await stub.ModelReady(
                ipb.ModelReadyRequest(name=name, version=str(artifact.version)), timeout=self.timeout_s
            )
        except grpc.RpcError as err:
            if err.code() in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.UNAUTHENTICATED,
            ):
                raise FailedPrecondition(f"predictor {address} refused to load {name}: {_reason(err)}") from None
            raise Unavailable(f"predictor {address} did not load {name}: {_reason(err)}") from None
        if not ready.ready:
            raise Unavailable(f"predictor {address} loaded {name} but version {artifact.version} is not ready")

    async def unload(self, address: str, name: str) -> None:
        """Unload `name` from the predictor at `address`; one it does not hold counts as unloaded."""
        try:
            await self._stub(address).RepositoryModelUnload(
                ipb.RepositoryModelUnloadRequest(model_name=name), timeout=self.timeout_s
            )
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise Unavailable(f"predictor {address} did not unload {name}: {_reason(err)}") from None

    async def forget(self, address: str) -> None:
        """Close the channel to a predictor that left."""
        entry = self._stubs.pop(address, None)
        if entry is not None:
            await entry[0].close()

    async def close(self) -> None:
        """Close every channel."""
        for address in list(self._stubs):
            await self.forget(address)
