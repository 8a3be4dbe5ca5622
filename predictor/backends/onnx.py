"""ONNX Runtime backend: one session per model version, graph optimisations on, threads set
deliberately (small models are fastest on one intra-op thread; concurrency comes from batching
and from running several sessions at once). Large models on the CPU run from an optimised copy whose
weights every process maps from one file (predictor.shared_weights)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as OrtInvalidArgument

from chassis.errors import InvalidArgument
from chassis.tensors import ONNX_TYPE
from predictor.backends.base import TensorSpec, merge_specs
from predictor.config import ModelConfig
from predictor.shared_weights import SharedWeights

log = logging.getLogger(__name__)


def _dims(shape: Sequence[object]) -> tuple[int, ...]:
    return tuple(dim if isinstance(dim, int) and dim > 0 else -1 for dim in shape)


def _as_text(name: str, array: np.ndarray) -> np.ndarray:
    """ONNX Runtime takes string tensors as str objects (it would str() a bytes object)."""
    try:
        items = [v.decode() if isinstance(v, bytes) else v for v in array.reshape(-1)]
    except UnicodeDecodeError as err:
        raise InvalidArgument(f"input {name!r}: a BYTES element is not UTF-8 text: {err}") from None
    text = np.empty(len(items), dtype=np.object_)
    text[:] = items
    return text.reshape(array.shape)


class OnnxSession:
    """An ONNX Runtime inference session for one model version."""

    platform: str = "onnxruntime_onnx"

    def __init__(
        self, model_bytes: bytes, config: ModelConfig, intra_op_threads: int, shared: SharedWeights | None = None
    ) -> None:
        options = _options(intra_op_threads)
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.shared_from: Path | None = None
        """The shared-weights model this session maps its weights from; None when they are its own."""
        if shared is not None and providers == ["CPUExecutionProvider"]:
            self._session = self._shared_session(model_bytes, options, providers, shared)
        else:
            self._session = _session(model_bytes, options, providers)
        model_inputs = [
            TensorSpec(i.name, ONNX_TYPE.get(i.type, i.type), _dims(i.shape)) for i in self._session.get_inputs()
        ]
        model_outputs = [
            TensorSpec(o.name, ONNX_TYPE.get(o.type, o.type), _dims(o.shape)) for o in self._session.get_outputs()
        ]
        self.inputs: Sequence[TensorSpec] = merge_specs(model_inputs, config.inputs, "input")
        self.outputs: Sequence[TensorSpec] = merge_specs(model_outputs, config.outputs, "output")
        self._size = len(model_bytes)

    def _shared_session(
        self, model_bytes: bytes, options: ort.SessionOptions, providers: list[str], shared: SharedWeights
    ) -> ort.InferenceSession:
        try:
            path = shared.model_path(model_bytes, options, providers)
            # Optimised when the entry was written: run the graph exactly as saved.
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as err:  # noqa: BLE001 - a bad model fails below with its own message
            log.warning("shared weights unavailable (%s: %s); this session holds its own", type(err).__name__, err)
            return _session(model_bytes, _options(options.intra_op_num_threads), providers)
        self.shared_from = path
        return session

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        names = list(outputs) or [o.name for o in self.outputs]
        feed = {name: _as_text(name, array) if array.dtype == np.object_ else array for name, array in inputs.items()}
        try:
            results = self._session.run(names, feed)
        except OrtInvalidArgument as err:
            raise InvalidArgument(f"the model rejected its inputs: {err}") from None
        return {name: np.asarray(value) for name, value in zip(names, results, strict=True)}

    def memory_bytes(self) -> int:
        return self._size

    def close(self) -> None:
        del self._session


def _options(intra_op_threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return options


def _session(model_bytes: bytes, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(model_bytes, sess_options=options, providers=providers)
    except Exception as err:  # noqa: BLE001 - ORT raises its own exception types for bad files
        raise InvalidArgument(f"model file could not be loaded by ONNX Runtime: {err}") from None


class OnnxRuntimeBackend:
    """Loads ONNX files into ONNX Runtime sessions (CUDA when the runtime has it, else CPU).

    Files of at least `shared_min_bytes` (0: none) run on the CPU from `shared`'s optimised copies,
    their weights mapped by every process rather than copied into each."""

    name = "onnxruntime"

    def __init__(
        self, intra_op_threads: int = 1, shared: SharedWeights | None = None, shared_min_bytes: int = 0
    ) -> None:
        self.intra_op_threads = intra_op_threads
        self.shared = shared
        self.shared_min_bytes = shared_min_bytes

    def load(self, model_bytes: bytes, config: ModelConfig) -> OnnxSession:
        share = self.shared is not None and 0 < self.shared_min_bytes <= len(model_bytes)
        return OnnxSession(model_bytes, config, self.intra_op_threads, self.shared if share else None)
