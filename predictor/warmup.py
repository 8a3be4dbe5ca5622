"""Warm-up: the configured warm-up samples (Triton's `model_warmup`), else synthetic inputs that
respect a model's schema, run before the version turns READY; then the latency budget, held to a
p99 over enough timed runs and measured again before the version is declared over it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chassis.errors import FailedPrecondition, FrescoError, InvalidArgument
from chassis.tensors import NUMPY_DTYPE, array_from_raw
from predictor.backends.base import Session, TensorSpec
from predictor.config import ModelConfig, WarmupInput, WarmupSample

# What synthetic BYTES inputs hold: "0" parses as a number, where "" fails models that parse one.
SYNTHETIC_BYTES = b"0"
WARMUP_DIR = "warmup"
SAMPLE_SEED = 0

Inputs = dict[str, np.ndarray]


def synthetic_inputs(specs: Sequence[TensorSpec], batch_size: int) -> Inputs:
    """Zero-valued inputs ("0" for BYTES) with the leading variable dimension set to `batch_size`,
    others to 1."""
    inputs: Inputs = {}
    for spec in specs:
        shape = tuple((batch_size if i == 0 else 1) if dim == -1 else dim for i, dim in enumerate(spec.shape))
        if spec.datatype == "BYTES":
            array = np.empty(shape, dtype=np.object_)
            array.fill(SYNTHETIC_BYTES)
            inputs[spec.name] = array
        else:
            inputs[spec.name] = np.zeros(shape, dtype=NUMPY_DTYPE[spec.datatype])
    return inputs


def _row_shape(spec: TensorSpec, given: WarmupInput, batched: bool, what: str) -> tuple[int, ...]:
    model_dims = spec.shape[1:] if batched else spec.shape
    if given.dims is None:
        return tuple(1 if dim == -1 else dim for dim in model_dims)
    if len(given.dims) != len(model_dims) or any(
        want != -1 and got != want for got, want in zip(given.dims, model_dims, strict=True)
    ):
        raise InvalidArgument(f"{what}: dims {given.dims} do not fit the model's {list(model_dims)}")
    return tuple(given.dims)


def _row(spec: TensorSpec, given: WarmupInput, shape: tuple[int, ...], model_dir: Path | None, what: str) -> np.ndarray:
    """One row of a sample input."""
    dtype = NUMPY_DTYPE[spec.datatype]
    count = int(np.prod(shape, dtype=np.int64))
    if given.zero_data:
        if spec.datatype == "BYTES":
            return np.full(shape, SYNTHETIC_BYTES, dtype=np.object_)
        return np.zeros(shape, dtype=dtype)
    if given.random_data:
        rng = np.random.default_rng(SAMPLE_SEED)  # seeded: every load warms with the same values
        if spec.datatype == "BYTES":
            return np.array([str(v).encode() for v in rng.integers(0, 100, count)], dtype=np.object_).reshape(shape)
        if spec.datatype == "BOOL":
            return rng.integers(0, 2, count).astype(np.bool_).reshape(shape)
        if dtype.kind in "iu":
            return rng.integers(0, 100, count).astype(dtype).reshape(shape)
        return rng.random(count).astype(dtype).reshape(shape)
    if given.data is not None:
        if len(given.data) != count:
            raise InvalidArgument(
                f"{what}: data holds {len(given.data)} values, a row of shape {list(shape)} needs {count}"
            )
        if spec.datatype == "BYTES":
            items = [v if isinstance(v, bytes) else str(v).encode() for v in given.data]
            array = np.empty(count, dtype=np.object_)
            array[:] = items
            return array.reshape(shape)
        try:
            return np.asarray(given.data, dtype=dtype).reshape(shape)
        except (TypeError, ValueError) as err:
            raise InvalidArgument(f"{what}: data does not fit {spec.datatype}: {err}") from None
    assert given.input_data_file is not None
    if model_dir is None:
        raise InvalidArgument(f"{what}: input_data_file needs a model directory")
    base = (model_dir / WARMUP_DIR).resolve()
    path = (base / given.input_data_file).resolve()
    if not path.is_relative_to(base):
        raise InvalidArgument(f"{what}: input_data_file {given.input_data_file!r} must lie under {WARMUP_DIR}/")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise InvalidArgument(
            f"{what}: input_data_file {given.input_data_file!r} cannot be read: {err.strerror}"
        ) from None
    return np.array(array_from_raw(raw, spec.datatype, shape, what))


def sample_inputs(
    sample: WarmupSample, specs: Sequence[TensorSpec], max_batch_size: int, model_dir: Path | None
) -> Inputs:
    """The inputs of one warm-up sample, checked against the model's inputs."""
    by_name = {spec.name: spec for spec in specs}
    if unknown := sorted(set(sample.inputs) - set(by_name)):
        raise InvalidArgument(
            f"warm-up sample {sample.name!r}: {unknown} are not inputs of the model; it takes {sorted(by_name)}"
        )
    if missing := sorted(set(by_name) - set(sample.inputs)):
        raise InvalidArgument(f"warm-up sample {sample.name!r} lacks inputs {missing}")
    batched = max_batch_size > 0
    inputs: Inputs = {}
    for name, given in sample.inputs.items():
        spec, what = by_name[name], f"warm-up sample {sample.name!r} input {name!r}"
        row = _row(spec, given, _row_shape(spec, given, batched, what), model_dir, what)
        inputs[name] = np.stack([row] * min(sample.batch_size, max_batch_size)) if batched else row
    return inputs


@dataclass(frozen=True)
class WarmupReport:
    """What warming a version measured."""

    seconds: float
    p99_ms: float
    runs: int


def _requests(
    session: Session, config: ModelConfig, max_batch_size: int, model_dir: Path | None
) -> list[tuple[str, Inputs]]:
    if config.warmup.samples:
        return [
            (f"warm-up sample {s.name!r}", sample_inputs(s, session.inputs, max_batch_size, model_dir))
            for s in config.warmup.samples
        ]
    sizes = config.warmup.batch_sizes or [1, *config.batching.preferred_batch_sizes]
    sizes = sorted({min(size, max_batch_size) if max_batch_size else 1 for size in sizes})
    return [
        (f'synthetic warm-up data (zeros, BYTES "0") at batch size {size}', synthetic_inputs(session.inputs, size))
        for size in sizes
    ]


def warm(
    session: Session,
    config: ModelConfig,
    max_batch_size: int,
    model_dir: Path | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> WarmupReport:
    """Run each warm-up request `1 + runs` times (blocking: call it off the event loop), then hold
    the p99 of `latency_runs` timed runs to the latency budget, up to `latency_attempts` times.

    Raises FailedPrecondition naming the request when the model fails on warm-up data, or when
    every attempt is over the budget.
    """
    warmup = config.warmup
    requests = _requests(session, config, max_batch_size, model_dir)
    start = clock()

    def timed(label: str, inputs: Inputs) -> float:
        t0 = clock()
        try:
            session.run(inputs, [])
        except FrescoError as err:
            raise FailedPrecondition(f"{label} failed: {err}; give warm-up samples the model takes") from None
        except Exception as err:  # noqa: BLE001 - a backend's own error on warm-up data
            raise FailedPrecondition(
                f"{label} failed: {type(err).__name__}: {err}; give warm-up samples the model takes"
            ) from None
        return (clock() - t0) * 1000

    latencies: list[float] = []
    for label, inputs in requests:
        timed(label, inputs)  # the first run pays for lazy initialisation; not counted
        latencies.extend(timed(label, inputs) for _ in range(warmup.runs))
    p99 = float(np.percentile(latencies, 99))
    budget = config.latency_budget_ms
    if budget is not None:
        measured: list[float] = []
        for _ in range(warmup.latency_attempts):
            runs = [timed(*requests[i % len(requests)]) for i in range(warmup.latency_runs)]
            p99 = float(np.percentile(runs, 99))
            measured.append(p99)
            if p99 <= budget:
                break
        else:
            what = ", ".join(label for label, _ in requests)
            raise FailedPrecondition(
                f"warm p99 latency {min(measured):.2f} ms exceeds the latency budget of {budget:g} ms "
                f"on each of {warmup.latency_attempts} attempts of {warmup.latency_runs} runs "
                f"(p99 of each: {', '.join(f'{m:.2f}' for m in measured)} ms; {what})"
            )
    return WarmupReport(clock() - start, p99, len(latencies))
