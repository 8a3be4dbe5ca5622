"""Warm-up before a version turns READY: synthetic inputs of the model's schema at each batch size,
and the latency budget checked on the warm runs, alone and through the model store."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

from chassis.errors import FailedPrecondition, Unavailable
from predictor.backends.base import TensorSpec
from predictor.config import ModelConfig
from predictor.models import ModelStore, State
from predictor.repository import ModelRepository
from predictor.warmup import synthetic_inputs, warm

# The budget's message, for a budget of 1e-6 ms: the measured p99 and the budget, both named.
OVER_BUDGET = r"warm p99 latency \d+\.\d\d ms exceeds the latency budget of 1e-06 ms"


class RecordingSession:
    """A session that records the shape of every input it is run on."""

    platform = "test"

    def __init__(self, inputs: Sequence[TensorSpec]) -> None:
        self.inputs = list(inputs)
        self.outputs = [TensorSpec("y", "FP32", (-1,))]
        self.runs: list[dict[str, tuple[int, ...]]] = []

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        self.runs.append({name: array.shape for name, array in inputs.items()})
        first = next(iter(inputs.values()))
        return {"y": np.zeros(first.shape[:1], np.float32)}

    def memory_bytes(self) -> int:
        return 0

    def close(self) -> None:
        pass

    @property
    def batch_sizes(self) -> list[int]:
        return [shapes["X"][0] for shapes in self.runs]


def x_session() -> RecordingSession:
    return RecordingSession([TensorSpec("X", "FP32", (-1, 8))])


def test_warm_runs_each_batch_size_capped_at_the_max() -> None:
    session = x_session()
    config = ModelConfig.model_validate({"warmup": {"runs": 3, "batch_sizes": [8, 1, 4, 100]}})
    report = warm(session, config, max_batch_size=64)
    # One untimed run, then `runs` timed ones, per size, in ascending order; 100 becomes 64.
    assert session.batch_sizes == [1] * 4 + [4] * 4 + [8] * 4 + [64] * 4
    assert all(shapes == {"X": (size, 8)} for shapes, size in zip(session.runs, session.batch_sizes, strict=True))
    assert report.runs == 12
    assert report.p99_ms > 0
    assert report.seconds > 0


def test_warm_defaults_to_one_and_the_preferred_sizes() -> None:
    session = x_session()
    config = ModelConfig.model_validate({"batching": {"preferred_batch_sizes": [16, 4]}, "warmup": {"runs": 2}})
    assert warm(session, config, max_batch_size=64).runs == 6
    assert session.batch_sizes == [1] * 3 + [4] * 3 + [16] * 3


def test_a_model_that_does_not_batch_warms_at_one() -> None:
    session = x_session()
    config = ModelConfig.model_validate({"warmup": {"runs": 2, "batch_sizes": [4, 8]}})
    warm(session, config, max_batch_size=0)
    assert session.batch_sizes == [1] * 3


def test_an_impossible_latency_budget_fails_with_the_budget_and_p99() -> None:
    config = ModelConfig.model_validate({"latency_budget_ms": 0.000001, "warmup": {"runs": 2}})
    with pytest.raises(FailedPrecondition, match=OVER_BUDGET) as failure:
        warm(x_session(), config, max_batch_size=64)
    assert "batch sizes [1], 2 runs each" in str(failure.value)
    generous = ModelConfig.model_validate({"latency_budget_ms": 10000})
    assert warm(x_session(), generous, max_batch_size=64).p99_ms < 10000


def test_synthetic_inputs_follow_the_schema() -> None:
    specs = [
        TensorSpec("dense", "FP32", (-1, 8)),
        TensorSpec("ids", "INT64", (-1, -1, 3)),
        TensorSpec("fixed", "FP64", (2, 3)),
        TensorSpec("late", "INT32", (4, -1)),
        TensorSpec("text", "BYTES", (-1,)),
        TensorSpec("flag", "BOOL", ()),
    ]
    inputs = synthetic_inputs(specs, batch_size=5)
    shapes = {name: (array.shape, array.dtype) for name, array in inputs.items()}
    assert shapes == {
        "dense": ((5, 8), np.dtype(np.float32)),
        "ids": ((5, 1, 3), np.dtype(np.int64)),
        "fixed": ((2, 3), np.dtype(np.float64)),
        "late": ((4, 1), np.dtype(np.int32)),
        "text": ((5,), np.dtype(object)),
        "flag": ((), np.dtype(np.bool_)),
    }
    assert list(inputs["text"]) == [b""] * 5
    assert not inputs["dense"].any()
    assert not inputs["ids"].any()


def _set_budget(repository: Path, budget_ms: float) -> None:
    path = repository / "demo" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**config, "latency_budget_ms": budget_ms, "warmup": {"runs": 3}}))


async def test_a_version_over_its_budget_ends_unavailable(repository: Path, executor: ThreadPoolExecutor) -> None:
    _set_budget(repository, 0.000001)
    store = ModelStore(ModelRepository(repository), executor)
    try:
        model = await store.load("demo")
        assert model.state is State.UNAVAILABLE
        version = model.versions[1]
        assert version.state is State.UNAVAILABLE
        assert version.session is None
        assert version.batcher is None
        assert pytest.approx(0) == version.warm_p99_ms
        assert re.search(OVER_BUDGET, version.reason), version.reason
        assert "version 1: warm p99 latency" in model.reason
        with pytest.raises(Unavailable, match="has no READY version"):
            store.get("demo")
    finally:
        await store.close()


async def test_a_version_within_its_budget_serves(repository: Path, executor: ThreadPoolExecutor) -> None:
    _set_budget(repository, 10000)
    store = ModelStore(ModelRepository(repository), executor)
    try:
        model = await store.load("demo")
        assert model.state is State.READY, model.reason
        version = store.get("demo")
        assert version.reason == ""
        assert 0 < version.warm_p99_ms < 10000
        assert version.warm_seconds > 0
        x = np.zeros((3, 8), np.float32)
        assert (await store.infer(version, {"X": x}, ["label"]))["label"].shape == (3,)

        # A reload over budget keeps the warm version serving.
        _set_budget(repository, 0.000001)
        reloaded = await store.load("demo")
        assert reloaded.state is State.UNAVAILABLE
        assert store.get("demo") is version
        assert version.state is State.READY
        assert "reload failed, previous versions still serving" in store.model("demo").reason
        assert "latency budget of 1e-06 ms" in store.model("demo").reason
    finally:
        await store.close()
