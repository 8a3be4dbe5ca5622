"""The batching benchmark's model: a wide scikit-learn MLP (32 → 4096 → 4096 → 4096 → 1, ~135 MB of FP32
weights), exported with skl2onnx for Fresco and saved with joblib for MLServer. One row costs a few
milliseconds (every weight is read once per row), while 32 rows cost barely more per weight read: the
kind of model batching should pay on."""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

from bench.predictor.models import ModelFiles, export_onnx, fresco_config, synthetic_data, write_mlserver_model
from bench.predictor.spec import MODEL_NAME

HIDDEN = (4096, 4096, 4096)
TRAIN_ROWS = 512
SEED = 11


def train_wide_mlp() -> tuple[Any, float]:
    """MLPRegressor(HIDDEN) after one pass over a few hundred rows: real weights, seconds to fit."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPRegressor

    x, y = synthetic_data(TRAIN_ROWS, seed=SEED)
    model = MLPRegressor(hidden_layer_sizes=HIDDEN, max_iter=1, batch_size=256, random_state=SEED)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the benchmark needs its cost, not its fit
        model.fit(x, y)
    return model, time.perf_counter() - start


def write_repository(repository: Path, onnx_bytes: bytes, batching: dict[str, Any]) -> None:
    """A Fresco repository holding the model with the given `batching` section of config.yaml."""
    model_dir = repository / MODEL_NAME
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "1" / "model.onnx").write_bytes(onnx_bytes)
    config = {**fresco_config(), "batching": batching} if batching else fresco_config()
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def build(workdir: Path) -> tuple[ModelFiles, Path]:
    """Train and lay out the model under `workdir` (wiped first): the files, and a second repository
    with batching off (the first, `fresco_repository`, keeps the config's batching defaults)."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    model, train_seconds = train_wide_mlp()
    onnx_bytes = export_onnx(model)
    onnx_file = workdir / "wide-mlp.onnx"
    onnx_file.write_bytes(onnx_bytes)
    batching_on, batching_off = workdir / "fresco-batching", workdir / "fresco-no-batching"
    write_repository(batching_on, onnx_bytes, {})
    write_repository(batching_off, onnx_bytes, {"enabled": False})
    mlserver_dir = workdir / "mlserver-model"
    write_mlserver_model(mlserver_dir, model)
    sample, _ = synthetic_data(8, seed=SEED + 1)
    files = ModelFiles(
        fresco_repository=batching_on,
        mlserver_model_dir=mlserver_dir,
        onnx_file=onnx_file,
        big_model_dir=batching_on / MODEL_NAME,
        big_model_bytes=len(onnx_bytes),
        train_seconds=train_seconds,
        sample=sample,
    )
    return files, batching_off
