"""Inference backends. Each is one module implementing `predictor.backends.base.Backend`."""

from __future__ import annotations

from predictor.backends.base import Backend, BackendOptions
from predictor.config import ModelConfig


def backend_for(config: ModelConfig, options: BackendOptions) -> Backend:
    """The backend a model version runs on."""
    from predictor.backends.onnx import OnnxRuntimeBackend

    return OnnxRuntimeBackend(options.onnx_intra_op_threads)
