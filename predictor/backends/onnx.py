"""ONNX Runtime backend: one session per model version, graph optimisations on, threads set
deliberately (small models are fastest on one intra-op thread; concurrency comes from batching
and from running several sessions at once)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as OrtInvalidArgument

from chassis.errors import InvalidArgument
from chassis.tensors import ONNX_TYPE
from predictor.backends.base import TensorSpec, merge_specs
from predictor.config import ModelConfig


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

    def __init__(self, model_bytes: bytes, config: ModelConfig, intra_op_threads: int) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        try:
            self._session = ort.InferenceSession(model_bytes, sess_options=options, providers=providers)
        except Exception as err:  # noqa: BLE001 - ORT raises its own exception types for bad files
            raise InvalidArgument(f"model file could not be loaded by ONNX Runtime: {err}") from None
        model_inputs = [
            TensorSpec(i.name, ONNX_TYPE.get(i.type, i.type), _dims(i.shape)) for i in self._session.get_inputs()
        ]
        model_outputs = [
            TensorSpec(o.name, ONNX_TYPE.get(o.type, o.type), _dims(o.shape)) for o in self._session.get_outputs()
        ]
        self.inputs: Sequence[TensorSpec] = merge_specs(model_inputs, config.inputs, "input")
        self.outputs: Sequence[TensorSpec] = merge_specs(model_outputs, config.outputs, "output")
        self._size = len(model_bytes)

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


class OnnxRuntimeBackend:
    """Loads ONNX files into ONNX Runtime sessions (CUDA when the runtime has it, else CPU)."""

    name = "onnxruntime"

    def __init__(self, intra_op_threads: int = 1) -> None:
        self.intra_op_threads = intra_op_threads

    def load(self, model_bytes: bytes, config: ModelConfig) -> OnnxSession:
        return OnnxSession(model_bytes, config, self.intra_op_threads)
