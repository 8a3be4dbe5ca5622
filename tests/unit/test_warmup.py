"""Warm-up before a version turns READY: synthetic inputs of the model's schema at each batch size,
and the latency budget checked on the warm runs, alone and through the model store."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from onnx import TensorProto, helper

from chassis.errors import FailedPrecondition, InvalidArgument, Unavailable
from predictor.backends.base import TensorSpec
from predictor.config import ModelConfig, WarmupSample
from predictor.models import ModelStore, State
from predictor.repository import ModelRepository
from predictor.warmup import sample_inputs, synthetic_inputs, warm

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
    assert "on each of 3 attempts of 200 runs" in str(failure.value)
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
    assert list(inputs["text"]) == [b"0"] * 5  # "" would fail a model that parses numbers
    assert not inputs["dense"].any()
    assert not inputs["ids"].any()


def _set_budget(repository: Path, budget_ms: float) -> None:
    path = repository / "demo" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    warmup = {"runs": 3, "latency_runs": 20, "latency_attempts": 2}
    path.write_text(yaml.safe_dump({**config, "latency_budget_ms": budget_ms, "warmup": warmup}))


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


# -- the latency budget: a p99 over enough runs, measured again before failing ----------------------


class ClockedSession(RecordingSession):
    """A session whose every run takes the time `latency_ms(call)` on a clock of its own, so that
    latency figures are exact and the tests deterministic."""

    def __init__(self, latency_ms: Callable[[int], float]) -> None:
        super().__init__([TensorSpec("X", "FP32", (-1, 8))])
        self.now = 0.0
        self.latency_ms = latency_ms

    def clock(self) -> float:
        return self.now

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        self.now += self.latency_ms(len(self.runs)) / 1000
        return super().run(inputs, outputs)


BUDGETED = {"latency_budget_ms": 5, "warmup": {"runs": 5}}


def test_one_slow_run_does_not_fail_the_budget() -> None:
    """Run 3 (a timed one of the first five) and every hundredth after are slow: the maximum of five
    runs was over the budget; the p99 of 200 is not."""
    session = ClockedSession(lambda call: 100.0 if call % 100 == 3 else 1.0)
    report = warm(session, ModelConfig.model_validate(BUDGETED), max_batch_size=64, clock=session.clock)
    assert len(session.runs) == 1 + 5 + 200
    assert report.p99_ms < 5


def test_the_budget_is_measured_again_before_the_version_fails() -> None:
    """The first measurement is slow throughout (a noisy neighbour), the second is not: READY."""
    session = ClockedSession(lambda call: 10.0 if call < 6 + 200 else 1.0)
    report = warm(session, ModelConfig.model_validate(BUDGETED), max_batch_size=64, clock=session.clock)
    assert len(session.runs) == 6 + 2 * 200
    assert report.p99_ms == pytest.approx(1.0)


def test_a_budget_missed_on_every_attempt_fails_naming_each_measurement() -> None:
    session = ClockedSession(lambda call: 10.0)
    with pytest.raises(FailedPrecondition) as failure:
        warm(session, ModelConfig.model_validate(BUDGETED), max_batch_size=64, clock=session.clock)
    assert len(session.runs) == 6 + 3 * 200
    message = str(failure.value)
    assert "warm p99 latency 10.00 ms exceeds the latency budget of 5 ms on each of 3 attempts of 200 runs" in message
    assert "p99 of each: 10.00, 10.00, 10.00 ms" in message


# -- warm-up data the model can take ------------------------------------------------------------


class FailingSession(RecordingSession):
    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        raise RuntimeError("stod")


def test_a_failure_on_synthetic_data_says_so() -> None:
    with pytest.raises(FailedPrecondition) as failure:
        warm(FailingSession([TensorSpec("text", "BYTES", (-1,))]), ModelConfig(), max_batch_size=64)
    message = str(failure.value)
    assert message.startswith('synthetic warm-up data (zeros, BYTES "0") at batch size 1 failed: RuntimeError: stod')
    assert "give warm-up samples the model takes" in message


def test_samples_replace_synthetic_data(tmp_path: Path) -> None:
    specs = [TensorSpec("X", "FP32", (-1, 3)), TensorSpec("text", "BYTES", (-1, 2)), TensorSpec("n", "INT64", (-1,))]
    (tmp_path / "warmup").mkdir()
    (tmp_path / "warmup" / "text.bin").write_bytes(b"\x01\x00\x00\x007\x02\x00\x00\x0042")
    sample = WarmupSample.model_validate(
        {
            "name": "typical",
            "batch_size": 4,
            "inputs": {
                "X": {"data": [0.5, 1, 2]},
                "text": {"input_data_file": "text.bin"},
                "n": {"random_data": True},
            },
        }
    )
    inputs = sample_inputs(sample, specs, max_batch_size=64, model_dir=tmp_path)
    np.testing.assert_array_equal(inputs["X"], np.array([[0.5, 1, 2]] * 4, np.float32))
    assert inputs["text"].tolist() == [[b"7", b"42"]] * 4
    assert inputs["n"].shape == (4,)
    # Seeded: every load warms with the same values.
    again = sample_inputs(sample, specs, max_batch_size=64, model_dir=tmp_path)
    np.testing.assert_array_equal(inputs["n"], again["n"])
    # batch_size is capped by what the model takes.
    assert sample_inputs(sample, specs, max_batch_size=2, model_dir=tmp_path)["X"].shape == (2, 3)

    session = RecordingSession(specs)
    config = ModelConfig.model_validate({"warmup": {"runs": 2, "samples": [sample.model_dump()]}})
    assert warm(session, config, max_batch_size=64, model_dir=tmp_path).runs == 2
    assert [shapes["X"] for shapes in session.runs] == [(4, 3)] * 3


@pytest.mark.parametrize(
    ("inputs", "problem"),
    [
        ({"X": {"data": [1, 2]}}, "data holds 2 values, a row of shape [3] needs 3"),
        ({"X": {"zero_data": True}, "Y": {"zero_data": True}}, "['Y'] are not inputs of the model"),
        ({}, "lacks inputs ['X']"),
        ({"X": {"input_data_file": "../../etc/passwd"}}, "must lie under warmup/"),
        ({"X": {"input_data_file": "absent.bin"}}, "input_data_file 'absent.bin' cannot be read"),
        ({"X": {"zero_data": True, "dims": [4]}}, "dims [4] do not fit the model's [3]"),
    ],
)
def test_bad_samples_are_invalid_naming_the_sample(tmp_path: Path, inputs: dict[str, object], problem: str) -> None:
    sample = WarmupSample.model_validate({"name": "s", "inputs": inputs})
    with pytest.raises(InvalidArgument, match=re.escape(problem)):
        sample_inputs(sample, [TensorSpec("X", "FP32", (-1, 3))], max_batch_size=8, model_dir=tmp_path)


def _write_parsing_model(root: Path, config: dict[str, object] | None = None) -> None:
    """A model that parses numbers from strings (ONNX Cast STRING -> FLOAT): "" makes it fail."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["text"], ["value"], to=TensorProto.FLOAT)],
        "parse",
        [helper.make_tensor_value_info("text", TensorProto.STRING, [None])],
        [helper.make_tensor_value_info("value", TensorProto.FLOAT, [None])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (root / "parse" / "1").mkdir(parents=True)
    (root / "parse" / "1" / "model.onnx").write_bytes(model.SerializeToString())
    if config is not None:
        (root / "parse" / "config.yaml").write_text(yaml.safe_dump(config))


async def test_a_model_that_parses_numbers_turns_ready_on_synthetic_data(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    _write_parsing_model(tmp_path)
    store = ModelStore(ModelRepository(tmp_path), executor)
    try:
        model = await store.load("parse")
        assert model.state is State.READY, model.reason
        text = np.array([b"2.5", b"-1"], dtype=object)
        result = await store.infer(store.get("parse"), {"text": text}, [])
        np.testing.assert_array_equal(result["value"], np.array([2.5, -1], np.float32))
    finally:
        await store.close()


async def test_warm_up_samples_from_config_yaml(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    good = {"warmup": {"samples": [{"name": "prices", "batch_size": 3, "inputs": {"text": {"data": ["19.99"]}}}]}}
    _write_parsing_model(tmp_path, good)
    store = ModelStore(ModelRepository(tmp_path), executor)
    try:
        assert (await store.load("parse")).state is State.READY
        bad = {"warmup": {"samples": [{"name": "words", "inputs": {"text": {"data": ["abc"]}}}]}}
        (tmp_path / "parse" / "config.yaml").write_text(yaml.safe_dump(bad))
        reloaded = await store.load("parse")
        assert reloaded.state is State.UNAVAILABLE
        assert "version 1: warm-up sample 'words' failed" in reloaded.reason
    finally:
        await store.close()
