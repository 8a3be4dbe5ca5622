"""The TensorRT backend: its pure logic everywhere, and real engines where a GPU with TensorRT exists."""

from __future__ import annotations

import os
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from chassis.errors import FailedPrecondition, InvalidArgument
from chassis.tensors import NUMPY_DTYPE
from fresco.training import train_classifier
from predictor.backends import tensorrt as tensorrt_backend
from predictor.backends.base import BackendOptions
from predictor.backends.onnx import OnnxRuntimeBackend
from predictor.backends.tensorrt import (
    TRT_DATATYPES,
    BuildOptions,
    DeviceInfo,
    EngineCache,
    Profile,
    TensorRTBackend,
    batch_range,
    cache_key,
    check_int8,
    inspect_onnx,
    parse_options,
    plan_profiles,
    protocol_datatype,
)
from predictor.config import BatchingConfig, ModelConfig, TensorConfig

UNAVAILABLE = tensorrt_backend.unavailable_reason()
needs_gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        UNAVAILABLE is not None,
        reason=f"needs an NVIDIA GPU with TensorRT 10 and pycuda; this machine has none ({UNAVAILABLE})",
    ),
]


def mlp_onnx(features: int = 8, hidden: int = 16, seed: int = 3, batch: int | str = "N") -> bytes:
    """X FP32 [batch, features] → MatMul → Add → Relu → MatMul → Y FP32 [batch, 1]: ops TensorRT runs."""
    rng = np.random.default_rng(seed)
    weights = [
        numpy_helper.from_array(rng.normal(size=(features, hidden)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(size=hidden).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(size=(hidden, 1)).astype(np.float32), "w2"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "w1"], ["h"]),
            helper.make_node("Add", ["h", "b1"], ["hb"]),
            helper.make_node("Relu", ["hb"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["Y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, features])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [batch, 1])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def qdq_onnx() -> bytes:
    """A model already carrying its INT8 scales as QuantizeLinear/DequantizeLinear nodes."""
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["X", "scale", "zero"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["Y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4])],
        [
            numpy_helper.from_array(np.array(0.05, dtype=np.float32), "scale"),
            numpy_helper.from_array(np.array(0, dtype=np.int8), "zero"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


# --- pure logic: runs everywhere -------------------------------------------------------------------------------

GPU = DeviceInfo("NVIDIA L4", (8, 9))
PROFILES = {"X": Profile((1, 8), (32, 8), (64, 8))}


def key(**changes: object) -> str:
    args: dict[str, object] = {
        "model_bytes": b"model",
        "options": BuildOptions(),
        "profiles": PROFILES,
        "profile_copies": 1,
        "device": GPU,
        "trt_version": "10.3.0",
    }
    return cache_key(**(args | changes))  # type: ignore[arg-type]


def test_cache_key_is_stable() -> None:
    assert key() == key()
    assert len(key()) == 64
    assert int(key(), 16) >= 0


@pytest.mark.parametrize(
    "change",
    [
        {"model_bytes": b"model2"},
        {"options": BuildOptions(fp16=True)},
        {"options": BuildOptions(workspace_mb=512)},
        {"options": BuildOptions(opt_batch_size=8)},
        {"profiles": {"X": Profile((1, 8), (32, 8), (128, 8))}},
        {"profile_copies": 2},
        {"device": DeviceInfo("NVIDIA A100-SXM4-40GB", (8, 9))},
        {"device": DeviceInfo("NVIDIA L4", (9, 0))},
        {"trt_version": "10.4.0"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_cache_key_changes_with_what_shapes_the_engine(change: dict[str, object]) -> None:
    assert key(**change) != key()


def test_parse_options_reads_every_option() -> None:
    raw = {"fp16": True, "int8": False, "workspace_mb": 256, "opt_batch_size": 16}
    assert parse_options(raw, max_batch_size=64) == BuildOptions(fp16=True, workspace_mb=256, opt_batch_size=16)
    assert parse_options({}, max_batch_size=64) == BuildOptions()


@pytest.mark.parametrize(
    ("raw", "option"),
    [
        ({"fp32": True}, "tensorrt.fp32"),
        ({"fp16": "yes"}, "tensorrt.fp16"),
        ({"int8": 1}, "tensorrt.int8"),
        ({"workspace_mb": 0}, "tensorrt.workspace_mb"),
        ({"workspace_mb": True}, "tensorrt.workspace_mb"),
        ({"workspace_mb": "1024"}, "tensorrt.workspace_mb"),
        ({"opt_batch_size": -4}, "tensorrt.opt_batch_size"),
        ({"opt_batch_size": 65}, "tensorrt.opt_batch_size"),
    ],
)
def test_bad_options_are_invalid_arguments_naming_the_option(raw: dict[str, object], option: str) -> None:
    with pytest.raises(InvalidArgument, match=option.replace(".", r"\.")):
        parse_options(raw, max_batch_size=64)


def test_options_come_through_model_config() -> None:
    config = ModelConfig.model_validate({"tensorrt": {"fp16": True, "opt_batch_size": 4}})
    assert parse_options(config.tensorrt, config.batching.max_batch_size) == BuildOptions(fp16=True, opt_batch_size=4)


@pytest.mark.parametrize(
    ("options", "batching", "expected"),
    [
        (BuildOptions(opt_batch_size=4), BatchingConfig(max_batch_size=32, preferred_batch_sizes=[8, 16]), (4, 32)),
        (BuildOptions(), BatchingConfig(max_batch_size=32, preferred_batch_sizes=[16, 8]), (16, 32)),
        (BuildOptions(), BatchingConfig(max_batch_size=32), (32, 32)),
    ],
)
def test_batch_range_prefers_option_then_preferred_sizes_then_max(
    options: BuildOptions, batching: BatchingConfig, expected: tuple[int, int]
) -> None:
    assert batch_range(options, batching) == expected


def test_profile_of_a_variable_batch_with_fixed_features() -> None:
    assert plan_profiles({"X": (-1, 8)}, [], opt_batch=16, max_batch=64) == {"X": Profile((1, 8), (16, 8), (64, 8))}


def test_config_fixes_dims_the_model_leaves_variable() -> None:
    declared = [TensorConfig(name="X", datatype="FP32", shape=[-1, 3, 224])]
    assert plan_profiles({"X": (-1, -1, 224)}, declared, 8, 8) == {"X": Profile((1, 3, 224), (8, 3, 224), (8, 3, 224))}


def test_a_fixed_batch_dimension_stays_fixed() -> None:
    declared = [TensorConfig(name="X", datatype="FP32", shape=[4, 8])]
    assert plan_profiles({"X": (1, 8)}, [], 16, 64) == {"X": Profile((1, 8), (1, 8), (1, 8))}
    assert plan_profiles({"X": (-1, 8)}, declared, 16, 64) == {"X": Profile((4, 8), (4, 8), (4, 8))}


@pytest.mark.parametrize(
    ("model", "declared", "message"),
    [
        ({"X": (-1, -1)}, [], r"'X' dimension 1 is variable in the model and config\.yaml does not fix it"),
        ({"X": (-1, 8)}, [TensorConfig(name="X", datatype="FP32", shape=[-1, 9])], r"dimension 1 is 9.*model's is 8"),
        ({"X": (-1, 8)}, [TensorConfig(name="X", datatype="FP32", shape=[-1])], r"has 1 dimensions.*has 2"),
        ({"X": (-1, 8)}, [TensorConfig(name="Z", datatype="FP32", shape=[-1, 8])], r"'Z' is not in the model"),
    ],
)
def test_profiles_refuse_what_tensorrt_cannot_size(
    model: dict[str, tuple[int, ...]], declared: list[TensorConfig], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        plan_profiles(model, declared, 16, 64)


def test_inspect_a_plain_mlp() -> None:
    facts = inspect_onnx(mlp_onnx())
    assert facts.inputs == {"X": (-1, 8)}
    assert facts.dynamic
    assert not facts.quantized
    assert facts.unsupported == ()
    assert not inspect_onnx(mlp_onnx(batch=2)).dynamic


def test_inspect_finds_what_tensorrt_cannot_run_in_the_demo_classifier(tmp_path: Path) -> None:
    exported = train_classifier(tmp_path, n_features=8)
    facts = inspect_onnx(exported.path.read_bytes())
    assert facts.inputs == {exported.input_name: (-1, 8)}
    assert facts.unsupported == ("ai.onnx.ml operator ArrayFeatureExtractor",)


@pytest.mark.parametrize("data", [b"", b"not an onnx model at all"])
def test_inspect_refuses_what_is_not_onnx(data: bytes) -> None:
    with pytest.raises(InvalidArgument, match="not an ONNX model"):
        inspect_onnx(data)


def test_int8_needs_a_quantized_model() -> None:
    assert inspect_onnx(qdq_onnx()).quantized
    check_int8(BuildOptions(int8=True), quantized=True)
    check_int8(BuildOptions(), quantized=False)
    with pytest.raises(InvalidArgument, match=r"tensorrt\.int8 needs INT8 scales.*QuantizeLinear/DequantizeLinear"):
        check_int8(BuildOptions(int8=True), quantized=False)


def test_datatype_table_maps_onto_protocol_datatypes() -> None:
    assert set(TRT_DATATYPES) == {"FLOAT", "HALF", "BF16", "INT8", "UINT8", "INT32", "INT64", "BOOL"}
    assert set(TRT_DATATYPES.values()) == {"FP32", "FP16", "BF16", "INT8", "UINT8", "INT32", "INT64", "BOOL"}
    assert all(datatype in NUMPY_DTYPE for datatype in TRT_DATATYPES.values())
    assert protocol_datatype("HALF", "y") == "FP16"
    with pytest.raises(InvalidArgument, match=r"tensor 'y' is FP8"):
        protocol_datatype("FP8", "y")


def test_engine_cache_round_trip_is_atomic(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "engines")
    assert cache.get("k") is None
    cache.put("k", b"plan-1")
    cache.put("k", b"plan-2")  # replaces
    assert cache.get("k") == b"plan-2"
    assert os.listdir(tmp_path / "engines") == ["k.plan"]  # no temp files left behind
    cache.discard("k")
    assert cache.get("k") is None


def test_a_failed_cache_write_is_logged_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(src: str, dst: object) -> None:
        raise OSError("read-only file system")

    monkeypatch.setattr(os, "replace", refuse)
    cache = EngineCache(tmp_path)
    cache.put("k", b"plan")
    assert cache.get("k") is None
    assert os.listdir(tmp_path) == []
    assert "could not cache TensorRT engine" in caplog.text


def test_cache_dir_defaults_under_the_home_directory() -> None:
    assert TensorRTBackend(BackendOptions()).cache.root == Path.home() / ".cache/fresco/trt-engines"
    assert TensorRTBackend(BackendOptions(), cache_dir=Path("/x")).cache.root == Path("/x")


# --- availability: never raises, and says why ------------------------------------------------------------------


def fake_gpu(monkeypatch: pytest.MonkeyPatch, version: str = "10.3.0", devices: int = 1, init_error: bool = False):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version  # type: ignore[attr-defined]
    cuda = types.ModuleType("pycuda.driver")

    def init() -> None:
        if init_error:
            raise RuntimeError("cuInit failed: no CUDA-capable device is detected")

    cuda.init = init  # type: ignore[attr-defined]
    cuda.Device = types.SimpleNamespace(count=lambda: devices)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "pycuda", types.ModuleType("pycuda"))
    monkeypatch.setitem(sys.modules, "pycuda.driver", cuda)


@pytest.mark.skipif(UNAVAILABLE is None, reason="this machine has a GPU with TensorRT")
def test_not_available_here_and_says_why() -> None:
    assert tensorrt_backend.available() is False
    assert tensorrt_backend.unavailable_reason()


@pytest.mark.parametrize(
    ("fake", "reason"),
    [
        ({"version": "8.6.1"}, "uses the TensorRT 10 API"),
        ({"devices": 0}, "sees no GPU"),
        ({"init_error": True}, "RuntimeError: cuInit failed"),
    ],
)
def test_availability_failures_are_reasons_not_exceptions(
    monkeypatch: pytest.MonkeyPatch, fake: dict[str, object], reason: str
) -> None:
    fake_gpu(monkeypatch, **fake)  # type: ignore[arg-type]
    assert tensorrt_backend.available() is False
    assert reason in (tensorrt_backend.unavailable_reason() or "")


def test_available_with_tensorrt_10_and_a_device(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch)
    assert tensorrt_backend.available() is True


def test_missing_modules_mean_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    assert tensorrt_backend.available() is False
    assert "ModuleNotFoundError" in (tensorrt_backend.unavailable_reason() or "")


# --- load: config errors before GPU work -----------------------------------------------------------------------


def test_load_refuses_the_demo_classifier_with_a_clear_reason(tmp_path: Path) -> None:
    model = train_classifier(tmp_path, n_features=8).path.read_bytes()
    with pytest.raises(InvalidArgument, match=r"ArrayFeatureExtractor.*use backend: onnxruntime"):
        TensorRTBackend(BackendOptions(), cache_dir=tmp_path).load(model, ModelConfig())


def test_load_checks_options_before_looking_for_a_gpu(tmp_path: Path) -> None:
    backend = TensorRTBackend(BackendOptions(), cache_dir=tmp_path)
    with pytest.raises(InvalidArgument, match=r"tensorrt\.int8"):
        backend.load(mlp_onnx(), ModelConfig.model_validate({"tensorrt": {"int8": True}}))
    with pytest.raises(InvalidArgument, match=r"tensorrt\.opt_batch_size"):
        backend.load(mlp_onnx(), ModelConfig.model_validate({"tensorrt": {"opt_batch_size": 1000}}))


@pytest.mark.skipif(UNAVAILABLE is None, reason="this machine has a GPU with TensorRT")
def test_load_without_a_gpu_is_a_failed_precondition(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="needs an NVIDIA GPU with TensorRT 10 and pycuda"):
        TensorRTBackend(BackendOptions(), cache_dir=tmp_path).load(mlp_onnx(), ModelConfig())
    assert not any(tmp_path.iterdir())


# --- real engines: only with a GPU -----------------------------------------------------------------------------


def reference(model: bytes, x: np.ndarray) -> np.ndarray:
    session = OnnxRuntimeBackend().load(model, ModelConfig())
    try:
        return session.run({"X": x}, ["Y"])["Y"]
    finally:
        session.close()


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)


class TestEngines:
    """Real engines built from a small ONNX MLP (the demo classifier's ai.onnx.ml label op is not TensorRT's)."""

    pytestmark = needs_gpu

    @pytest.mark.parametrize("batch", [1, 7, 64])
    def test_engine_matches_onnxruntime(self, tmp_path: Path, batch: int) -> None:
        model = mlp_onnx()
        session = TensorRTBackend(BackendOptions(), cache_dir=tmp_path).load(model, ModelConfig())
        try:
            assert session.platform == "tensorrt_plan"
            assert [(s.name, s.datatype, s.shape) for s in session.inputs] == [("X", "FP32", (-1, 8))]
            assert [(s.name, s.datatype, s.shape) for s in session.outputs] == [("Y", "FP32", (-1, 1))]
            x = rows(batch)
            y = session.run({"X": x}, [])["Y"]
            assert y.shape == (batch, 1)
            assert y.dtype == np.float32
            np.testing.assert_allclose(y, reference(model, x), rtol=1e-3, atol=1e-3)
            assert session.memory_bytes() > 0
        finally:
            session.close()

    def test_fp16_engine_is_close_to_onnxruntime(self, tmp_path: Path) -> None:
        model = mlp_onnx()
        config = ModelConfig.model_validate({"tensorrt": {"fp16": True, "workspace_mb": 256, "opt_batch_size": 8}})
        session = TensorRTBackend(BackendOptions(), cache_dir=tmp_path).load(model, config)
        try:
            x = rows(16)
            np.testing.assert_allclose(session.run({"X": x}, ["Y"])["Y"], reference(model, x), rtol=2e-2, atol=5e-2)
        finally:
            session.close()

    def test_second_load_deserializes_the_cached_engine(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        model, config, x = mlp_onnx(), ModelConfig(), rows(5)
        backend = TensorRTBackend(BackendOptions(), cache_dir=tmp_path)
        first = backend.load(model, config)
        expected = first.run({"X": x}, ["Y"])["Y"]
        first.close()
        assert not first.from_cache
        assert [p.suffix for p in tmp_path.iterdir()] == [".plan"]

        def no_build(*args: object) -> bytes:
            raise AssertionError("the cached engine should have been used")

        monkeypatch.setattr(tensorrt_backend, "_build_engine", no_build)
        second = backend.load(model, config)
        try:
            assert second.from_cache
            np.testing.assert_array_equal(second.run({"X": x}, ["Y"])["Y"], expected)
        finally:
            second.close()

    def test_a_corrupt_cache_entry_is_rebuilt(self, tmp_path: Path) -> None:
        model = mlp_onnx()
        backend = TensorRTBackend(BackendOptions(), cache_dir=tmp_path)
        backend.load(model, ModelConfig()).close()
        (plan,) = tmp_path.iterdir()
        plan.write_bytes(b"garbage")
        session = backend.load(model, ModelConfig())
        try:
            assert not session.from_cache
            assert plan.read_bytes() != b"garbage"
        finally:
            session.close()

    def test_concurrent_runs_from_threads(self, tmp_path: Path) -> None:
        model = mlp_onnx()
        config = ModelConfig.model_validate({"instance_count": 3, "batching": {"max_batch_size": 32}})
        session = TensorRTBackend(BackendOptions(), cache_dir=tmp_path).load(model, config)
        inputs = [rows(1 + i % 32, seed=i) for i in range(96)]
        try:
            with ThreadPoolExecutor(8) as pool:
                results = list(pool.map(lambda x: session.run({"X": x}, ["Y"])["Y"], inputs))
            for x, y in zip(inputs, results, strict=True):
                np.testing.assert_allclose(y, reference(model, x), rtol=1e-3, atol=1e-3)
        finally:
            session.close()

    def test_bad_inputs_are_invalid_arguments(self, tmp_path: Path) -> None:
        config = ModelConfig.model_validate({"batching": {"max_batch_size": 4}})
        session = TensorRTBackend(BackendOptions(), cache_dir=tmp_path).load(mlp_onnx(), config)
        try:
            with pytest.raises(InvalidArgument, match=r"shape \[5, 8\]; the engine takes \[1, 8\] to \[4, 8\]"):
                session.run({"X": rows(5)}, [])
            with pytest.raises(InvalidArgument, match="is float64, the engine takes FP32"):
                session.run({"X": rows(2).astype(np.float64)}, [])
            with pytest.raises(InvalidArgument, match="'X' is missing"):
                session.run({}, [])
            with pytest.raises(InvalidArgument, match="not outputs of the model"):
                session.run({"X": rows(2)}, ["Z"])
        finally:
            session.close()
