"""Inference backends. Each is one module implementing `predictor.backends.base.Backend`."""

from __future__ import annotations

from predictor.backends.base import Backend, BackendOptions
from predictor.config import ModelConfig


def backend_for(config: ModelConfig, options: BackendOptions, model_bytes: bytes) -> Backend:
    """The backend a model version runs on: TensorRT when asked, or when `auto` finds a GPU with
    TensorRT and the model has nothing TensorRT cannot run (e.g. ai.onnx.ml operators); else ONNX Runtime."""
    from predictor.backends import tensorrt

    if config.backend == "tensorrt" or (
        config.backend == "auto" and tensorrt.available() and not tensorrt.inspect_onnx(model_bytes).unsupported
    ):
        return tensorrt.TensorRTBackend(options, options.engine_cache_dir)
    from predictor.backends.onnx import OnnxRuntimeBackend
    from predictor.shared_weights import SharedWeights

    return OnnxRuntimeBackend(
        options.onnx_intra_op_threads, SharedWeights(options.shared_weights_dir), options.shared_weights_min_bytes
    )
