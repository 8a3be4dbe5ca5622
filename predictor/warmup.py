"""Warm-up: synthetic inputs that respect a model's schema, run at each batch size before the
version turns READY, with the latency budget checked on the warm runs."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from chassis.errors import FailedPrecondition
from chassis.tensors import NUMPY_DTYPE
from predictor.backends.base import Session, TensorSpec
from predictor.config import ModelConfig


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


@dataclass(frozen=True)
class WarmupReport:
    """What warming a version measured."""

    seconds: float
    p99_ms: float
    runs: int


def warm(session: Session, config: ModelConfig, max_batch_size: int) -> WarmupReport:
    """Run synthetic requests at each warm-up batch size (blocking: call it off the event loop).

    Raises FailedPrecondition when the warm p99 exceeds the model's latency budget.
    """
    sizes = config.warmup.batch_sizes or [1, *config.batching.preferred_batch_sizes]
    sizes = sorted({min(size, max_batch_size) if max_batch_size else 1 for size in sizes})
    latencies: list[float] = []
    start = time.perf_counter()
    for size in sizes:
        inputs = synthetic_inputs(session.inputs, size)
        session.run(inputs, [])  # the first run pays for lazy initialisation; not timed
        for _ in range(config.warmup.runs):
            t0 = time.perf_counter()
            session.run(inputs, [])
            latencies.append((time.perf_counter() - t0) * 1000)
    p99 = float(np.percentile(latencies, 99))
    budget = config.latency_budget_ms
    if budget is not None and p99 > budget:
        raise FailedPrecondition(
            f"warm p99 latency {p99:.2f} ms exceeds the latency budget of {budget:g} ms "
            f"(batch sizes {sizes}, {config.warmup.runs} runs each)"
        )
    return WarmupReport(time.perf_counter() - start, p99, len(latencies))
