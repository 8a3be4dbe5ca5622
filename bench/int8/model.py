"""The benchmark's real scikit-learn model: a wide MLP classifier on the breast cancer dataset that ships with
scikit-learn (569 tumours, 30 measurements, malignant or benign), exported to ONNX, with its held-out rows as the
backtest dataset and a sample of its training rows as the calibration sample."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
from skl2onnx import to_onnx
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fresco.api.models.v1 import registry_pb2 as rpb

SEED = 7
INPUT = "X"


@dataclass(frozen=True)
class BenchModel:
    """The exported model, its signature, and where its backtest dataset and calibration sample are."""

    artifact: bytes
    signature: rpb.ModelSignature
    backtest: Path
    backtest_sha256: str
    calibration: Path
    hidden: tuple[int, ...]
    train_rows: int
    test_rows: int


def _columns(names: list[str]) -> list[str]:
    return [name.replace(" ", "_") for name in names]


def _write(path: Path, features: np.ndarray, names: list[str], labels: np.ndarray | None) -> None:
    columns = {name: features[:, i].astype(np.float64) for i, name in enumerate(names)}
    if labels is not None:
        columns["label"] = labels.astype(np.int64)
    pq.write_table(pa.table(columns), path)


def build(directory: Path, hidden: tuple[int, ...]) -> BenchModel:
    """Train (standardise, then the MLP), export with probabilities as an array, write both Parquet files."""
    directory.mkdir(parents=True, exist_ok=True)
    data = load_breast_cancer()
    names = _columns(list(data.feature_names))
    features = np.asarray(data.data, dtype=np.float32)
    labels = np.asarray(data.target)
    train_x, test_x, train_y, test_y = train_test_split(
        features, labels, test_size=0.4, random_state=SEED, stratify=labels
    )
    classifier = MLPClassifier(hidden, max_iter=60, random_state=SEED)
    pipeline = make_pipeline(StandardScaler(), classifier)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings: the model is good enough well before
        pipeline.fit(train_x, train_y)
    exported = to_onnx(pipeline, train_x[:1], options={id(classifier): {"zipmap": False}}, target_opset=17)
    artifact = bytes(exported.SerializeToString())
    backtest, calibration = directory / "backtest.parquet", directory / "calibration.parquet"
    _write(backtest, test_x, names, test_y)
    _write(calibration, train_x, names, None)
    input_name = exported.graph.input[0].name
    signature = rpb.ModelSignature(
        inputs=[rpb.TensorSpec(name=input_name, datatype="FP32", shape=[-1, len(names)])],
        outputs=[
            rpb.TensorSpec(name="label", datatype="INT64", shape=[-1]),
            rpb.TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 2]),
        ],
        feature_refs=names,
        feature_input=input_name,
    )
    return BenchModel(
        artifact,
        signature,
        backtest,
        hashlib.sha256(backtest.read_bytes()).hexdigest(),
        calibration,
        hidden,
        len(train_y),
        len(test_y),
    )
