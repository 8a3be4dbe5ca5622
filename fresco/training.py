"""Small real models for demos, tests and benchmarks: trained with scikit-learn, exported to ONNX
with skl2onnx, written as a model-repository entry the predictor serves. The demo's story uses three
versions of one model: v1, a better v2 on the same data, and a v3 that fails on live traffic."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

# The demo data: the first TRAIN_ROWS rows train every version, the rest are held out to compare them.
TRAIN_ROWS = 2000
HOLDOUT_ROWS = 1000
# v3's fault: a row whose first feature has |x| >= 0.5 indexes past a two-entry table (~80% of the rows).
FAULT_SCALE = 4.0


@dataclass(frozen=True)
class ExportedModel:
    """A model written into a repository, with the data it was checked on."""

    name: str
    version: int
    path: Path
    feature_names: list[str]
    input_name: str
    sample: np.ndarray


@dataclass(frozen=True)
class Dataset:
    """The synthetic classification data of the demo model: a training part and a held-out part."""

    train_features: np.ndarray
    train_labels: np.ndarray
    holdout_features: np.ndarray
    holdout_labels: np.ndarray


def demo_dataset(n_features: int = 8, seed: int = 7) -> Dataset:
    """The same rows for a given (n_features, seed), whichever version is trained on them."""
    from sklearn.datasets import make_classification

    features, labels = make_classification(
        n_samples=TRAIN_ROWS + HOLDOUT_ROWS,
        n_features=n_features,
        n_informative=max(2, n_features // 2),
        random_state=seed,
    )
    features = features.astype(np.float32)
    return Dataset(features[:TRAIN_ROWS], labels[:TRAIN_ROWS], features[TRAIN_ROWS:], labels[TRAIN_ROWS:])


def train_classifier(
    repository: Path,
    name: str = "demo",
    version: int = 1,
    n_features: int = 8,
    hidden: tuple[int, ...] = (32,),
    seed: int = 7,
    feature_names: list[str] | None = None,
    *,
    alpha: float = 1e-4,
    max_iter: int = 300,
) -> ExportedModel:
    """Train an MLP classifier on the training part of `demo_dataset` and write
    `<repository>/<name>/<version>/model.onnx` plus a config.yaml naming its features."""
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier

    data = demo_dataset(n_features, seed)
    model = MLPClassifier(hidden_layer_sizes=hidden, alpha=alpha, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on a toy problem
        model.fit(data.train_features, data.train_labels)
    onnx_model = to_onnx(model, data.train_features[:1], options={id(model): {"zipmap": False}}, target_opset=17)
    path = _version_path(repository, name, version)
    path.write_bytes(onnx_model.SerializeToString())
    input_name = onnx_model.graph.input[0].name
    feature_names = feature_names or [f"f{i}" for i in range(n_features)]
    config = {
        "inputs": [{"name": input_name, "datatype": "FP32", "shape": [-1, n_features], "features": feature_names}],
    }
    (repository / name / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return ExportedModel(name, version, path, feature_names, input_name, data.train_features[:256])


def train_better_classifier(
    repository: Path, name: str = "demo", version: int = 2, seed: int = 7, feature_names: list[str] | None = None
) -> ExportedModel:
    """v2 of the demo model: the same data as `train_classifier`, a wider and more regularised network
    trained longer, which scores better on the held-out rows (AUC, log-loss and accuracy)."""
    return train_classifier(
        repository, name, version, hidden=(64,), seed=seed, feature_names=feature_names, alpha=0.1, max_iter=1000
    )


def train_tiny_classifier(
    repository: Path, name: str = "demo", version: int = 4, seed: int = 7, feature_names: list[str] | None = None
) -> ExportedModel:
    """v4 of the demo model: two hidden units trained briefly on the same data, far cheaper and clearly less
    accurate on the held-out rows (about 0.81 against v2's 0.95)."""
    return train_classifier(repository, name, version, hidden=(2,), seed=seed, feature_names=feature_names, max_iter=30)


def write_failing_model(base: ExportedModel, repository: Path, version: int = 3) -> ExportedModel:
    """A deliberately bad version: `base`'s graph whose probabilities are multiplied by a GatherElements
    indexed by floor(|first feature| * FAULT_SCALE) into a two-entry table of ones. It loads and answers
    zeros (the predictor's warm-up) exactly like `base`, but ONNX Runtime fails (FAIL, a server error, not
    the INVALID_ARGUMENT of bad input) the batch of any row with |x0| >= 0.5: most live rows."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(base.path))
    graph = model.graph
    for node in graph.node:  # base's own nodes (e.g. the label's ArgMax) read the unchanged probabilities
        for names in (node.input, node.output):
            for i, tensor in enumerate(names):
                if tensor == "probabilities":
                    names[i] = "base_probabilities"
    table = helper.make_tensor("fault_table", TensorProto.FLOAT, [2], [1.0, 1.0])
    constants = {
        "fault_starts": [0],
        "fault_ends": [1],
        "fault_axes": [1],
        "fault_axis": [1],
    }
    graph.initializer.extend(
        [table, helper.make_tensor("fault_scale", TensorProto.FLOAT, [], [FAULT_SCALE])]
        + [helper.make_tensor(key, TensorProto.INT64, [1], value) for key, value in constants.items()]
    )
    first = graph.input[0].name
    graph.node.extend(
        [
            helper.make_node("Slice", [first, "fault_starts", "fault_ends", "fault_axes"], ["fault_x0"]),
            helper.make_node("Squeeze", ["fault_x0", "fault_axis"], ["fault_x0_flat"]),
            helper.make_node("Abs", ["fault_x0_flat"], ["fault_abs"]),
            helper.make_node("Mul", ["fault_abs", "fault_scale"], ["fault_scaled"]),
            helper.make_node("Floor", ["fault_scaled"], ["fault_floor"]),
            helper.make_node("Cast", ["fault_floor"], ["fault_index"], to=TensorProto.INT64),
            helper.make_node("GatherElements", ["fault_table", "fault_index"], ["fault_ones"], axis=0),
            helper.make_node("Unsqueeze", ["fault_ones", "fault_axis"], ["fault_column"]),
            helper.make_node("Mul", ["base_probabilities", "fault_column"], ["probabilities"]),
        ]
    )
    onnx.checker.check_model(model)
    path = _version_path(repository, base.name, version)
    path.write_bytes(model.SerializeToString())
    return ExportedModel(base.name, version, path, base.feature_names, base.input_name, base.sample)


def write_holdout(path: Path, feature_names: list[str] | None = None, n_features: int = 8, seed: int = 7) -> Path:
    """The held-out rows of `demo_dataset` as Parquet, one FP32 column per feature plus an int64 `label`: the
    labelled data a backtest gate scores candidate and production versions on."""
    import pyarrow as pa  # type: ignore[import-untyped]
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    data = demo_dataset(n_features, seed)
    names = feature_names or [f"f{i}" for i in range(n_features)]
    columns = {name: pa.array(data.holdout_features[:, i]) for i, name in enumerate(names)}
    columns["label"] = pa.array(data.holdout_labels.astype(np.int64))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def evaluate(path: Path, features: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """AUC, log-loss and accuracy of an exported classifier on labelled rows, scored with onnxruntime."""
    import onnxruntime as ort
    from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probabilities = session.run(["probabilities"], {session.get_inputs()[0].name: features})[0]
    positive = np.asarray(probabilities)[:, 1]
    return {
        "auc": float(roc_auc_score(labels, positive)),
        "logloss": float(log_loss(labels, positive)),
        "accuracy": float(accuracy_score(labels, positive >= 0.5)),
    }


def _version_path(repository: Path, name: str, version: int) -> Path:
    version_dir = repository / name / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    return version_dir / "model.onnx"
