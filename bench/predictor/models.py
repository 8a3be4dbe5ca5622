"""The benchmark's models: a small scikit-learn MLP served by every server (ONNX for Fresco, joblib for
MLServer), and a ~10 MB ONNX MLP with random weights for timing model loads."""

from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib  # type: ignore[import-untyped]
import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

from bench.predictor.spec import BIG_MODEL_NAME, FEATURES, INPUT_NAME, MLSERVER_OUTPUT_NAME, MODEL_NAME, OUTPUT_NAME

HIDDEN = (256, 256)
BIG_HIDDEN = (1152, 1152, 1152)  # 32·1152 + 2·1152² + 1152 ≈ 2.69M FP32 weights ≈ 10.8 MB
TRAIN_ROWS = 4000
SEED = 7


@dataclass(frozen=True)
class ModelFiles:
    """Where the benchmark's models were written."""

    fresco_repository: Path
    """A Fresco model repository holding only the small model: <repo>/mlp/1/model.onnx + config.yaml."""
    mlserver_model_dir: Path
    """An MLServer model directory: model-settings.json (without batching) and model.joblib."""
    onnx_file: Path
    """The small model's ONNX file, for the in-process ceiling."""
    big_model_dir: Path
    """A Fresco model directory (config.yaml, 1/model.onnx) to copy into the repository to time loads."""
    big_model_bytes: int
    train_seconds: float
    sample: np.ndarray
    """A few input rows, to check the servers' answers against each other."""


def synthetic_data(rows: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """A smooth nonlinear regression target over `FEATURES` standard-normal features."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, FEATURES)).astype(np.float32)
    w = rng.standard_normal(FEATURES).astype(np.float32)
    y = np.tanh(x @ w / np.sqrt(FEATURES)) + 0.1 * np.sin(x[:, 0] * x[:, 1]) + 0.05 * rng.standard_normal(rows)
    return x, y.astype(np.float32)


def train_mlp() -> tuple[Any, float]:
    """MLPRegressor(hidden_layer_sizes=(256, 256)) fitted for a few seconds; returns it and its training time."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPRegressor

    x, y = synthetic_data(TRAIN_ROWS)
    model = MLPRegressor(hidden_layer_sizes=HIDDEN, max_iter=15, batch_size=200, random_state=SEED)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a few epochs are plenty for a benchmark
        model.fit(x, y)
    return model, time.perf_counter() - start


def export_onnx(model: Any) -> bytes:
    """The fitted MLP as ONNX: input `input` FP32 [-1, 32], output `variable` FP32 [-1, 1]."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    onx = convert_sklearn(model, initial_types=[(INPUT_NAME, FloatTensorType([None, FEATURES]))])
    names = [output.name for output in onx.graph.output]
    if names != [OUTPUT_NAME]:
        raise RuntimeError(f"skl2onnx named the outputs {names}, expected [{OUTPUT_NAME!r}]")
    return bytes(onx.SerializeToString())


def big_mlp_onnx(hidden: tuple[int, ...] = BIG_HIDDEN, seed: int = SEED) -> bytes:
    """An MLP 32 → hidden… → 1 with random weights, built with onnx's helper (MatMul, Add, Relu)."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    previous, width = INPUT_NAME, FEATURES
    sizes = [*hidden, 1]
    for layer, size in enumerate(sizes):
        weight = (rng.standard_normal((width, size)) / np.sqrt(width)).astype(np.float32)
        bias = np.zeros(size, dtype=np.float32)
        initializers += [numpy_helper.from_array(weight, f"w{layer}"), numpy_helper.from_array(bias, f"b{layer}")]
        last = layer == len(sizes) - 1
        nodes.append(helper.make_node("MatMul", [previous, f"w{layer}"], [f"mm{layer}"]))
        nodes.append(helper.make_node("Add", [f"mm{layer}", f"b{layer}"], [OUTPUT_NAME if last else f"add{layer}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"add{layer}"], [f"relu{layer}"]))
            previous = f"relu{layer}"
        width = size
    graph = helper.make_graph(
        nodes,
        "mlp_big",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [None, FEATURES])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [None, 1])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench.predictor")
    model.ir_version = 8  # readable by any onnxruntime of the last years
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def fresco_config() -> dict[str, Any]:
    """The predictor's config.yaml for the MLP (schema: predictor/config.py); batching is left at its defaults."""
    return {
        "inputs": [
            {
                "name": INPUT_NAME,
                "datatype": "FP32",
                "shape": [-1, FEATURES],
                "features": [f"f{i:02d}" for i in range(FEATURES)],  # optional; lets the gateway fill it by name
            }
        ],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, 1]}],
    }


def write_fresco_model(model_dir: Path, onnx_bytes: bytes) -> None:
    """<model_dir>/config.yaml and <model_dir>/1/model.onnx."""
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "1" / "model.onnx").write_bytes(onnx_bytes)
    (model_dir / "config.yaml").write_text(yaml.safe_dump(fresco_config(), sort_keys=False))


def mlserver_model_settings(max_batch_size: int, max_batch_time_s: float) -> dict[str, Any]:
    """MLServer's model-settings.json for the joblib model, with adaptive batching on or off."""
    return {
        "name": MODEL_NAME,
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": "1"},
        "max_batch_size": max_batch_size,
        "max_batch_time": max_batch_time_s,
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, FEATURES]}],
        "outputs": [{"name": MLSERVER_OUTPUT_NAME, "datatype": "FP64", "shape": [-1, 1]}],
    }


def write_mlserver_model(model_dir: Path, model: Any, max_batch_size: int = 0, max_batch_time_s: float = 0.0) -> None:
    """<model_dir>/model.joblib and <model_dir>/model-settings.json."""
    model_dir.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, model_dir / "model.joblib")
    settings = mlserver_model_settings(max_batch_size, max_batch_time_s)
    (model_dir / "model-settings.json").write_text(json.dumps(settings, indent=2))


def build_models(workdir: Path) -> ModelFiles:
    """Train, export and lay out every model under `workdir` (wiped first)."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    model, train_seconds = train_mlp()
    onnx_bytes = export_onnx(model)

    repository = workdir / "fresco-repository"
    write_fresco_model(repository / MODEL_NAME, onnx_bytes)
    onnx_file = workdir / "mlp.onnx"
    onnx_file.write_bytes(onnx_bytes)

    mlserver_dir = workdir / "mlserver-model"
    write_mlserver_model(mlserver_dir, model)

    big_bytes = big_mlp_onnx()
    big_dir = workdir / "big-model" / BIG_MODEL_NAME
    write_fresco_model(big_dir, big_bytes)

    sample, _ = synthetic_data(8, seed=SEED + 1)
    return ModelFiles(
        fresco_repository=repository,
        mlserver_model_dir=mlserver_dir,
        onnx_file=onnx_file,
        big_model_dir=big_dir,
        big_model_bytes=len(big_bytes),
        train_seconds=train_seconds,
        sample=sample,
    )
