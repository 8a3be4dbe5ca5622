"""The backend interface: small, so that a new backend is one module."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from chassis.errors import InvalidArgument
from predictor.config import ModelConfig, TensorConfig


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
    inline_below_us: int = 0  # batches faster than this run on the event loop (see DynamicBatcher)
    engine_cache_dir: Path | None = None  # TensorRT engines; None means ~/.cache/fresco/trt-engines
    shared_weights_min_bytes: int = 0  # ONNX files this large map shared weights (predictor.shared_weights); 0: never
    shared_weights_dir: Path | None = None  # None means ~/.cache/fresco/shared-weights


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


def merge_specs(model_side: Sequence[TensorSpec], declared: Sequence[TensorConfig], kind: str) -> list[TensorSpec]:
    """The tensors to serve: the model's own, refined by what config.yaml declares (`kind` is input or output)."""
    if not declared:
        return list(model_side)
    by_name = {spec.name: spec for spec in model_side}
    merged = []
    for tensor in declared:
        actual = by_name.get(tensor.name)
        if actual is None:
            raise InvalidArgument(f"config.yaml {kind} {tensor.name!r} is not in the model; it has {sorted(by_name)}")
        if actual.datatype != tensor.datatype:
            raise InvalidArgument(
                f"config.yaml {kind} {tensor.name!r} says {tensor.datatype}, the model says {actual.datatype}"
            )
        merged.append(
            TensorSpec(
                name=tensor.name,
                datatype=tensor.datatype,
                shape=tuple(tensor.shape),
                features=tuple(tensor.features or ()),
                allow_nan=tensor.allow_nan,
            )
        )
    if kind == "input" and (missing := sorted(set(by_name) - {t.name for t in declared})):
        raise InvalidArgument(f"config.yaml leaves out model inputs {missing}")
    return merged
