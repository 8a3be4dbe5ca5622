"""TensorRT backend: builds an engine from the model's ONNX bytes (cached on disk, keyed by all that shapes
it) and runs it with pycuda buffers and a pool of execution contexts. tensorrt and pycuda are imported only
inside functions, so the module and its pure helpers work on machines without a GPU."""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
import queue
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from chassis.errors import FailedPrecondition, InvalidArgument, Unavailable
from chassis.tensors import NUMPY_DTYPE
from predictor.backends.base import BackendOptions, TensorSpec, merge_specs
from predictor.config import BatchingConfig, ModelConfig, TensorConfig

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("~/.cache/fresco/trt-engines")
_RECIPE = 1  # bump when the build recipe changes in a way the other cache-key parts do not capture

# TensorRT DataType member names → protocol datatypes. Keyed by name so members an installed TensorRT
# lacks (BF16 before 9.0) cost nothing; FP8/INT4/FP4 have no protocol datatype and are refused.
TRT_DATATYPES: dict[str, str] = {"FLOAT": "FP32", "HALF": "FP16", "BF16": "BF16", "BOOL": "BOOL"} | {
    name: name for name in ("INT8", "UINT8", "INT32", "INT64")
}

OPTION_TYPES: dict[str, type] = {"fp16": bool, "int8": bool, "workspace_mb": int, "opt_batch_size": int}


@dataclass(frozen=True)
class BuildOptions:
    """The `tensorrt:` section of config.yaml, validated."""

    fp16: bool = False
    int8: bool = False
    workspace_mb: int | None = None
    opt_batch_size: int | None = None


class Profile(NamedTuple):
    """One input's optimisation-profile shapes."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class OnnxFacts:
    """What the backend needs to know of an ONNX model before TensorRT sees it."""

    inputs: dict[str, tuple[int, ...]]  # graph inputs (not initializers), -1 for variable dims
    quantized: bool  # carries QuantizeLinear/DequantizeLinear nodes (explicit quantization)
    unsupported: tuple[str, ...]  # what TensorRT cannot run: ai.onnx.ml operators, string tensors

    @property
    def dynamic(self) -> bool:
        return any(dim < 0 for shape in self.inputs.values() for dim in shape)


@dataclass(frozen=True)
class DeviceInfo:
    """The GPU an engine is built for; engines do not move between GPU models or TensorRT versions."""

    name: str
    compute_capability: tuple[int, int]


def parse_options(raw: Mapping[str, object], max_batch_size: int) -> BuildOptions:
    """Validate config.yaml's `tensorrt:` mapping; errors name the offending option."""
    for key, value in raw.items():
        kind = OPTION_TYPES.get(key)
        if kind is None:
            raise InvalidArgument(f"config.yaml tensorrt.{key} is not an option; expected {', '.join(OPTION_TYPES)}")
        if kind is bool and not isinstance(value, bool):
            raise InvalidArgument(f"config.yaml tensorrt.{key} must be true or false, got {value!r}")
        # bool is an int subclass: `workspace_mb: true` must not pass as 1
        if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidArgument(f"config.yaml tensorrt.{key} must be a positive integer, got {value!r}")
    opt = raw.get("opt_batch_size")
    if isinstance(opt, int) and opt > max_batch_size:
        raise InvalidArgument(
            f"config.yaml tensorrt.opt_batch_size {opt} exceeds batching.max_batch_size ({max_batch_size})"
        )
    workspace = raw.get("workspace_mb")
    return BuildOptions(
        fp16=raw.get("fp16") is True,
        int8=raw.get("int8") is True,
        workspace_mb=workspace if isinstance(workspace, int) else None,
        opt_batch_size=opt if isinstance(opt, int) else None,
    )


def batch_range(options: BuildOptions, batching: BatchingConfig) -> tuple[int, int]:
    """(opt, max) of the batch dimension: opt_batch_size, else the largest preferred size, else max."""
    opt = options.opt_batch_size or max(batching.preferred_batch_sizes, default=batching.max_batch_size)
    return opt, batching.max_batch_size


def plan_profiles(
    model_inputs: Mapping[str, Sequence[int]], declared: Sequence[TensorConfig], opt_batch: int, max_batch: int
) -> dict[str, Profile]:
    """Profile shapes per input: dim 0 of a variable batch runs 1..opt..max; every other dim is fixed,
    by the model or, where the model leaves it variable, by config.yaml."""
    by_name = {tensor.name: tensor for tensor in declared}
    if extra := sorted(set(by_name) - set(model_inputs)):
        raise InvalidArgument(f"config.yaml input {extra[0]!r} is not in the model; it has {sorted(model_inputs)}")
    profiles = {}
    for name, model_shape in model_inputs.items():
        config_shape = list(by_name[name].shape) if name in by_name else [-1] * len(model_shape)
        if len(config_shape) != len(model_shape):
            raise InvalidArgument(
                f"config.yaml input {name!r} has {len(config_shape)} dimensions, the model's has {len(model_shape)}"
            )
        dims = []
        for axis, (ours, theirs) in enumerate(zip(model_shape, config_shape, strict=True)):
            if ours > 0 and theirs not in (-1, ours):
                raise InvalidArgument(f"config.yaml input {name!r} dimension {axis} is {theirs}, the model's is {ours}")
            size = ours if ours > 0 else theirs
            if size > 0:
                dims.append((size, size, size))
            elif axis == 0:
                dims.append((1, opt_batch, max_batch))
            else:
                raise InvalidArgument(
                    f"input {name!r} dimension {axis} is variable in the model and config.yaml does not fix it; "
                    "TensorRT needs its size: declare the input's shape in config.yaml"
                )
        profiles[name] = Profile(*(tuple(d[i] for d in dims) for i in range(3)))
    return profiles


def check_int8(options: BuildOptions, quantized: bool) -> None:
    """INT8 without scales would silently run in higher precision, so refuse it unless the model carries them."""
    if options.int8 and not quantized:
        raise InvalidArgument(
            "config.yaml tensorrt.int8 needs INT8 scales: this backend takes no calibration data (TensorRT 10 "
            "deprecates calibrators), so export the model with QuantizeLinear/DequantizeLinear nodes, or drop int8"
        )


def protocol_datatype(trt_type: str, tensor: str) -> str:
    """The protocol datatype of a TensorRT DataType (by member name)."""
    try:
        return TRT_DATATYPES[trt_type]
    except KeyError:
        raise InvalidArgument(
            f"tensor {tensor!r} is {trt_type} in the engine; the protocol has no such datatype"
        ) from None


def cache_key(
    model_bytes: bytes,
    options: BuildOptions,
    profiles: Mapping[str, Profile],
    profile_copies: int,
    device: DeviceInfo,
    trt_version: str,
) -> str:
    """sha256 of everything that decides the engine: model, options, profiles, GPU and TensorRT."""
    material = {
        "recipe": _RECIPE,
        "model": hashlib.sha256(model_bytes).hexdigest(),
        "options": asdict(options),
        "profiles": {name: [list(shape) for shape in profile] for name, profile in sorted(profiles.items())},
        "profile_copies": profile_copies,
        "gpu": [device.name, list(device.compute_capability)],
        "tensorrt": trt_version,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def inspect_onnx(model_bytes: bytes) -> OnnxFacts:
    """Read an ONNX model's inputs and what matters to TensorRT, without TensorRT."""
    import onnx

    try:
        model = onnx.load_model_from_string(model_bytes)
    except Exception as err:  # noqa: BLE001 - protobuf raises DecodeError and friends
        raise InvalidArgument(f"model file is not an ONNX model: {err}") from None
    graph = model.graph
    if not graph.node:
        raise InvalidArgument("model file is not an ONNX model (its graph has no nodes)")
    initializers = {tensor.name for tensor in graph.initializer}
    inputs = {
        value.name: tuple(d.dim_value if d.dim_value > 0 else -1 for d in value.type.tensor_type.shape.dim)
        for value in graph.input
        if value.name not in initializers  # older exporters list weights as inputs too
    }
    nodes = list(_nodes(graph))
    unsupported = {f"ai.onnx.ml operator {n.op_type}" for n in nodes if n.domain == "ai.onnx.ml"}
    unsupported |= {
        f"string tensor {v.name!r}"
        for v in [*graph.input, *graph.output]
        if v.type.tensor_type.elem_type == onnx.TensorProto.STRING
    }
    quantized = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.domain in ("", "ai.onnx") for n in nodes)
    return OnnxFacts(inputs, quantized, tuple(sorted(unsupported)))


def _nodes(graph: Any) -> Iterator[Any]:
    """Every node, those of If/Loop/Scan bodies included."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for subgraph in [*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs]:
                yield from _nodes(subgraph)


class EngineCache:
    """Serialized engines on disk, one `<key>.plan` file each, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / f"{key}.plan"

    def get(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except OSError:
            return None

    def put(self, key: str, plan: bytes) -> None:
        """Write via a temp file + os.replace, so a reader never sees half an engine. A failed write
        only costs a rebuild next time, so it is logged, not raised."""
        tmp = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{key}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as file:
                file.write(plan)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, self.path(key))
        except OSError as err:
            log.warning("could not cache TensorRT engine in %s: %s", self.root, err)
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def discard(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)


def _import_gpu() -> tuple[Any, Any]:
    """tensorrt and pycuda.driver, typed Any: neither ships type information."""
    return importlib.import_module("tensorrt"), importlib.import_module("pycuda.driver")


def unavailable_reason() -> str | None:
    """Why the backend cannot run here, or None when it can. Never raises."""
    try:
        trt, cuda = _import_gpu()
        if int(str(trt.__version__).split(".")[0]) < 10:
            return f"TensorRT {trt.__version__} is installed; this backend uses the TensorRT 10 API"
        cuda.init()  # idempotent; raises when there is no driver
        if cuda.Device.count() < 1:
            return "the CUDA driver sees no GPU"
    except Exception as err:  # noqa: BLE001 - any failure here just means "not available"
        return f"{type(err).__name__}: {err}"
    return None


def available() -> bool:
    """True when tensorrt and pycuda import and a CUDA device exists."""
    return unavailable_reason() is None


_logger_lock = threading.Lock()
_logger: Any = None


def _trt_logger(trt: Any) -> Any:
    """One process-wide TensorRT logger: TensorRT warns when builders and runtimes get different ones."""
    global _logger
    with _logger_lock:
        if _logger is None:
            _logger = trt.Logger(trt.Logger.WARNING)
            trt.init_libnvinfer_plugins(_logger, "")  # ONNX ops TensorRT implements as plugins
        return _logger


def _build_engine(
    trt: Any, model_bytes: bytes, options: BuildOptions, profiles: Mapping[str, Profile], copies: int
) -> bytes:
    """Parse the ONNX bytes into an explicit-batch network and build a serialized engine."""
    logger = _trt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10 networks are always explicit-batch; the flag is deprecated
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InvalidArgument(f"TensorRT's ONNX parser rejected the model: {errors}")
    config = builder.create_builder_config()
    if options.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if options.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if options.int8:
        # Scales come from the model's Q/DQ nodes (check_int8). No platform check: every GPU TensorRT 10
        # supports (SM 7.0+, 7.5+ from 10.5) has INT8 and FP16 paths, and platform_has_fast_int8 is deprecated.
        config.set_flag(trt.BuilderFlag.INT8)
    variable = [network.get_input(i).name for i in range(network.num_inputs) if -1 in tuple(network.get_input(i).shape)]
    # Contexts running at once each need their own profile, so the same shapes go in `copies` times.
    for _ in range(copies if variable else 0):
        profile = builder.create_optimization_profile()
        for name in variable:
            profile.set_shape(name, *profiles[name])
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise InvalidArgument("TensorRT could not build an engine for the model; its log (stderr) says why")
    return bytes(plan)


@dataclass
class _Slot:
    """One execution context with its stream and its max-batch-sized buffers."""

    context: Any
    stream: Any
    host: dict[str, Any] = field(default_factory=dict)  # page-locked numpy arrays
    device: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0


def _dims(dims: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in dims)


class TensorRTSession:
    """A TensorRT engine for one model version, with one execution context per concurrent run."""

    platform: str = "tensorrt_plan"
    from_cache: bool = False  # whether the engine came from the on-disk cache rather than a build
    plan_bytes: int = 0  # size of the serialized engine, about what its weights take on the GPU

    def __init__(self, trt: Any, cuda: Any, cuda_context: Any, runtime: Any, engine: Any, config: ModelConfig) -> None:
        """Called with `cuda_context` (a retained primary context) current; it is the session's once
        this returns, and the caller's to release if this raises."""
        self._cuda, self._cuda_context, self._runtime, self._engine = cuda, cuda_context, runtime, engine
        self._closed = False
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {name: engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT for name in names}
        self._inputs = [name for name in names if is_input[name]]
        self._outputs = [name for name in names if not is_input[name]]
        if shaped := [name for name in self._inputs if engine.is_shape_inference_io(name)]:
            raise InvalidArgument(f"inputs {shaped} are shape tensors; this backend does not support them")
        self._datatypes = {name: protocol_datatype(engine.get_tensor_dtype(name).name, name) for name in names}
        shape = {name: _dims(engine.get_tensor_shape(name)) for name in names}
        specs = {name: TensorSpec(name, self._datatypes[name], shape[name]) for name in names}
        self.inputs: Sequence[TensorSpec] = merge_specs([specs[name] for name in self._inputs], config.inputs, "input")
        self.outputs: Sequence[TensorSpec] = merge_specs(
            [specs[name] for name in self._outputs], config.outputs, "output"
        )
        # (smallest, largest) shape per input; all profiles are alike, so profile 0 speaks for them.
        self._ranges: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        for name in self._inputs:
            low, _, high = engine.get_tensor_profile_shape(name, 0) if -1 in shape[name] else [shape[name]] * 3
            self._ranges[name] = (_dims(low), _dims(high))
        self._slots: list[_Slot] = []
        try:
            for index in range(config.instance_count):
                self._slots.append(_Slot(engine.create_execution_context(), cuda.Stream()))
                self._bind(self._slots[-1], index if engine.num_optimization_profiles > 1 else 0)
        except BaseException:
            self._release()
            raise
        self._pool: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        for slot in self._slots:
            self._pool.put(slot)
        # device_memory_size_v2 arrived in 10.1 and deprecates device_memory_size; both are per context.
        v2 = hasattr(engine, "device_memory_size_v2")
        activations = engine.device_memory_size_v2 if v2 else engine.device_memory_size
        self._memory = sum(slot.nbytes + int(activations) for slot in self._slots)

    def _bind(self, slot: _Slot, profile: int) -> None:
        """Give a new context its profile and buffers sized for the largest inputs."""
        if slot.context is None:
            raise RuntimeError("TensorRT could not create an execution context (out of GPU memory?)")
        if profile:
            slot.context.set_optimization_profile_async(profile, slot.stream.handle)
        for name in self._inputs:
            slot.context.set_input_shape(name, self._ranges[name][1])
        for name in self._inputs + self._outputs:
            # An output takes its largest shape at the largest inputs; a -1 left means data-dependent.
            shape = self._ranges[name][1] if name in self._ranges else _dims(slot.context.get_tensor_shape(name))
            if any(dim < 0 for dim in shape):
                raise InvalidArgument(f"output {name!r} has a data-dependent shape; this backend does not support it")
            host = self._cuda.pagelocked_empty(max(1, math.prod(shape)), NUMPY_DTYPE[self._datatypes[name]])
            slot.host[name], slot.device[name] = host, self._cuda.mem_alloc(host.nbytes)
            slot.context.set_tensor_address(name, int(slot.device[name]))  # fixed for the slot's life
            slot.nbytes += 2 * host.nbytes

    def _checked(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if extra := sorted(set(inputs) - set(self._inputs)):
            raise InvalidArgument(f"inputs {extra} are not inputs of the model; it has {self._inputs}")
        arrays = {}
        for name in self._inputs:
            if name not in inputs:
                raise InvalidArgument(f"input {name!r} is missing")
            array, datatype = inputs[name], self._datatypes[name]
            if array.dtype != NUMPY_DTYPE[datatype]:
                raise InvalidArgument(f"input {name!r} is {array.dtype}, the engine takes {datatype}")
            low, high = self._ranges[name]
            if array.ndim != len(low) or any(
                not lo <= d <= hi for d, lo, hi in zip(array.shape, low, high, strict=True)
            ):
                raise InvalidArgument(
                    f"input {name!r} has shape {list(array.shape)}; the engine takes {list(low)} to {list(high)}"
                )
            arrays[name] = np.ascontiguousarray(array)
        return arrays

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Run on a free context (waiting for one if all are busy); thread-safe."""
        wanted = list(outputs) or [spec.name for spec in self.outputs]
        if unknown := sorted(set(wanted) - set(self._outputs)):
            raise InvalidArgument(f"outputs {unknown} are not outputs of the model; it has {self._outputs}")
        arrays = self._checked(inputs)
        if self._closed:
            raise Unavailable("the TensorRT session is closed")
        slot = self._pool.get()
        self._cuda_context.push()  # pycuda contexts are per thread, and run comes from any pool thread
        try:
            return self._execute(slot, arrays, wanted)
        finally:
            self._cuda_context.pop()
            self._pool.put(slot)

    def _execute(self, slot: _Slot, arrays: Mapping[str, np.ndarray], wanted: Sequence[str]) -> dict[str, np.ndarray]:
        cuda, context, stream = self._cuda, slot.context, slot.stream
        try:
            for name, array in arrays.items():
                if not context.set_input_shape(name, array.shape):
                    raise InvalidArgument(f"TensorRT refused shape {list(array.shape)} for input {name!r}")
                host = slot.host[name][: array.size]
                np.copyto(host, array.reshape(-1))
                cuda.memcpy_htod_async(slot.device[name], host, stream)
            if not context.execute_async_v3(stream.handle):
                raise RuntimeError("TensorRT failed to enqueue the engine (see log)")
            shapes = {name: _dims(context.get_tensor_shape(name)) for name in wanted}
            views = {name: slot.host[name][: math.prod(shapes[name])] for name in wanted}
            for name in wanted:
                cuda.memcpy_dtoh_async(views[name], slot.device[name], stream)
        finally:
            stream.synchronize()  # pycuda releases the GIL while it waits; on error, no copy may outlive the run
        # Copies: the page-locked buffers belong to the slot and the next run overwrites them.
        return {name: views[name].reshape(shapes[name]).copy() for name in wanted}

    def memory_bytes(self) -> int:
        """Engine weights (plan size, approximately) + per-context activations + device and pinned buffers."""
        return self.plan_bytes + self._memory

    def close(self) -> None:
        """Free buffers, contexts and engine once every run has handed its context back."""
        if self._closed:
            return
        self._closed = True
        for _ in self._slots:
            self._pool.get()  # waits for in-flight runs
        self._cuda_context.push()
        try:
            self._release()
        finally:
            self._cuda_context.pop()
            self._cuda_context.detach()

    def _release(self) -> None:
        """Free what the slots hold (with the CUDA context current), then the engine and runtime."""
        for slot in self._slots:
            if slot.stream is not None:
                slot.stream.synchronize()
            for allocation in slot.device.values():
                allocation.free()
            for host in slot.host.values():
                host.base.free()  # the page-locked HostAllocation under the array
            slot.context = slot.stream = None
        self._slots.clear()
        self._engine = self._runtime = None  # contexts, then engine, then runtime


class TensorRTBackend:
    """Builds (or loads from its cache) a TensorRT engine for an ONNX model and serves it on GPU 0
    (choose the GPU with CUDA_VISIBLE_DEVICES)."""

    name = "tensorrt"

    def __init__(self, options: BackendOptions, cache_dir: Path | None = None) -> None:
        self.options = options
        root = cache_dir or getattr(options, "engine_cache_dir", None) or DEFAULT_CACHE_DIR
        self.cache = EngineCache(Path(root).expanduser())

    def load(self, model_bytes: bytes, config: ModelConfig) -> TensorRTSession:
        """Config errors surface before any GPU work, so they read the same on every machine."""
        facts = inspect_onnx(model_bytes)
        if facts.unsupported:
            raise InvalidArgument(
                f"TensorRT cannot run this model ({', '.join(facts.unsupported)}); use backend: onnxruntime"
            )
        options = parse_options(config.tensorrt, config.batching.max_batch_size)
        check_int8(options, facts.quantized)
        profiles = plan_profiles(facts.inputs, config.inputs, *batch_range(options, config.batching))
        copies = config.instance_count if facts.dynamic else 1
        if (reason := unavailable_reason()) is not None:
            raise FailedPrecondition(f"backend tensorrt needs an NVIDIA GPU with TensorRT 10 and pycuda: {reason}")
        trt, cuda = _import_gpu()
        gpu = cuda.Device(0)
        cuda_context = gpu.retain_primary_context()  # the context TensorRT's CUDA runtime calls use too
        cuda_context.push()
        try:
            major, minor = gpu.compute_capability()
            device = DeviceInfo(str(gpu.name()), (int(major), int(minor)))
            key = cache_key(model_bytes, options, profiles, copies, device, str(trt.__version__))
            runtime = trt.Runtime(_trt_logger(trt))
            plan, engine = self._cached(runtime, key)
            from_cache = engine is not None
            if engine is None:
                plan = _build_engine(trt, model_bytes, options, profiles, copies)
                engine = _deserialize(runtime, plan)
                if engine is None:
                    raise RuntimeError("TensorRT could not load the engine it just built (see log)")
                self.cache.put(key, plan)
            session = TensorRTSession(trt, cuda, cuda_context, runtime, engine, config)
            session.from_cache, session.plan_bytes = from_cache, len(plan)
        except BaseException:
            cuda_context.pop()
            cuda_context.detach()
            raise
        cuda_context.pop()
        return session

    def _cached(self, runtime: Any, key: str) -> tuple[bytes, Any]:
        """The cached plan and its engine, or (b"", None); a plan that no longer loads is dropped."""
        plan = self.cache.get(key)
        if plan is None:
            return b"", None
        engine = _deserialize(runtime, plan)
        if engine is None:
            log.warning("cached TensorRT engine %s does not load; rebuilding it", self.cache.path(key))
            self.cache.discard(key)
        return plan, engine


def _deserialize(runtime: Any, plan: bytes) -> Any:
    try:
        return runtime.deserialize_cuda_engine(plan)
    except Exception:  # noqa: BLE001 - a stale or corrupt cache file is rebuilt, whatever the error
        return None
