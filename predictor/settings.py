"""Predictor settings: flags of `python -m predictor`, or `FRESCO_PREDICTOR_*` variables."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import SettingsConfigDict

from chassis.settings import ServiceSettings


class PredictorSettings(ServiceSettings):
    """Settings of the predictor."""

    model_config = SettingsConfigDict(env_prefix="FRESCO_PREDICTOR_", cli_prog_name="python -m predictor")

    model_repository: Path = Path("models")
    """Directory of models: <repo>/<model>/config.yaml and <repo>/<model>/<version>/model.onnx."""
    inference_threads: int = 2
    """Threads running inference and model loads off the event loop."""
    onnx_intra_op_threads: int = 1
    """ONNX Runtime intra-op threads per session (1 is fastest for small models)."""
