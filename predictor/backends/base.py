"""The backend interface: small, so that a new backend is one module."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from predictor.config import ModelConfig


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as the server serves it: declared in config or read from the model."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    features: tuple[str, ...] = field(default=())
    allow_nan: bool = True


@dataclass(frozen=True)
class BackendOptions:
    """Server-wide knobs backends read when they build sessions."""

    onnx_intra_op_threads: int = 1


class Session(Protocol):
    """A loaded model version, ready to run."""

    platform: str
    inputs: Sequence[TensorSpec]
    outputs: Sequence[TensorSpec]

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Run the model; thread-safe, and releases the GIL while it computes."""
        ...

    def memory_bytes(self) -> int:
        """Approximate memory the session holds."""
        ...

    def close(self) -> None:
        """Release the session's resources."""
        ...


class Backend(Protocol):
    """Turns a model file into a `Session`."""

    name: str

    def load(self, model_bytes: bytes, config: ModelConfig) -> Session:
        """Build a session from the model file's bytes and the model's config."""
        ...
