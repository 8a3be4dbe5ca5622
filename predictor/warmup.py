"""Synthetic inputs that respect a model's input schema, for warm-up runs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from chassis.tensors import NUMPY_DTYPE
from predictor.backends.base import TensorSpec


def synthetic_inputs(specs: Sequence[TensorSpec], batch_size: int) -> dict[str, np.ndarray]:
    """Zero-valued inputs with the leading variable dimension set to `batch_size`, others to 1."""
    inputs: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = tuple((batch_size if i == 0 else 1) if dim == -1 else dim for i, dim in enumerate(spec.shape))
        if spec.datatype == "BYTES":
            array = np.empty(shape, dtype=np.object_)
            array.fill(b"")
            inputs[spec.name] = array
        else:
            inputs[spec.name] = np.zeros(shape, dtype=NUMPY_DTYPE[spec.datatype])
    return inputs
