"""Small real models for demos, tests and benchmarks: trained with scikit-learn, exported to ONNX
with skl2onnx, written as a model-repository entry the predictor serves."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml


@dataclass(frozen=True)
class ExportedModel:
    """A model written into a repository, with the data it was checked on."""

    name: str
    version: int
    path: Path
    feature_names: list[str]
    input_name: str
    sample: np.ndarray


def train_classifier(
    repository: Path,
    name: str = "demo",
    version: int = 1,
    n_features: int = 8,
    hidden: tuple[int, ...] = (32,),
    seed: int = 7,
    feature_names: list[str] | None = None,
) -> ExportedModel:
    """Train an MLP classifier on synthetic data and write `<repository>/<name>/<version>/model.onnx`
    plus a config.yaml naming its features."""
    from skl2onnx import to_onnx
    from sklearn.datasets import make_classification
    from sklearn.neural_network import MLPClassifier

    features, labels = make_classification(
        n_samples=2000, n_features=n_features, n_informative=max(2, n_features // 2), random_state=seed
    )
    features = features.astype(np.float32)
    model = MLPClassifier(hidden_layer_sizes=hidden, max_iter=300, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on a toy problem
        model.fit(features, labels)
    onnx_model = to_onnx(model, features[:1], options={id(model): {"zipmap": False}}, target_opset=17)
    model_dir = repository / name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    (version_dir / "model.onnx").write_bytes(onnx_model.SerializeToString())
    input_name = onnx_model.graph.input[0].name
    feature_names = feature_names or [f"f{i}" for i in range(n_features)]
    config = {
        "inputs": [{"name": input_name, "datatype": "FP32", "shape": [-1, n_features], "features": feature_names}],
    }
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return ExportedModel(name, version, version_dir / "model.onnx", feature_names, input_name, features[:256])
