"""What the gate tests share: real ONNX models trained here, a labelled Parquet dataset, their signature, and the
feature definitions a real feature service serves."""

from __future__ import annotations

import hashlib
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
from skl2onnx import to_onnx
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as pb_grpc
from fresco.api.models.v1 import registry_pb2 as rpb

FEATURES = 6
REFS = [f"user_stats:s{i}" for i in range(FEATURES)]
ROWS = 1200
SEED = 11
DEFINITIONS = (
    """
entities:
  - name: user
    join_keys: [{name: user_id, type: int64}]
feature_views:
  - name: user_stats
    entities: [user]
    features:
"""
    + "".join(f"      - {{name: s{i}, type: double}}\n" for i in range(FEATURES))
    + "      - {name: nickname, type: string}\n"
)


@dataclass(frozen=True)
class Models:
    """A good classifier, a worse one trained on scrambled labels, and the dataset both are backtested on."""

    good: bytes
    worse: bytes
    dataset: Path
    dataset_sha256: str


def _export(model: LogisticRegression, sample: np.ndarray) -> bytes:
    onnx = to_onnx(model, sample[:1], options={id(model): {"zipmap": False}}, target_opset=17)
    return bytes(onnx.SerializeToString())


def train_models(directory: Path) -> Models:
    """Both models and a Parquet dataset of held-out rows with a label and a `country` slice column."""
    features, labels = make_classification(n_samples=2 * ROWS, n_features=FEATURES, n_informative=4, random_state=SEED)
    features = features.astype(np.float32)
    train_x, train_y, test_x, test_y = features[:ROWS], labels[:ROWS], features[ROWS:], labels[ROWS:]
    rng = np.random.default_rng(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        good = LogisticRegression(max_iter=500).fit(train_x, train_y)
        worse = LogisticRegression(max_iter=500).fit(train_x, rng.permutation(train_y))
    columns = {f"s{i}": test_x[:, i].astype(np.float64) for i in range(FEATURES)}
    columns["label"] = test_y.astype(np.int64)
    columns["country"] = np.where(np.arange(test_y.size) % 3 == 0, "FR", "US")
    path = directory / "backtest.parquet"
    pq.write_table(pa.table(columns), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return Models(_export(good, train_x), _export(worse, train_x), path, digest)


def signature(refs: list[str] | None = None) -> rpb.ModelSignature:
    """The exported classifiers' signature: input X of the feature refs, outputs label and probabilities."""
    return rpb.ModelSignature(
        inputs=[rpb.TensorSpec(name="X", datatype="FP32", shape=[-1, FEATURES])],
        outputs=[
            rpb.TensorSpec(name="label", datatype="INT64", shape=[-1]),
            rpb.TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 2]),
        ],
        feature_refs=refs or REFS,
        feature_input="X",
    )


def backtest_gate(dataset: Path, **fields: object) -> rpb.BacktestGate:
    """A backtest of the dataset on the positive-class probability, AUC at least 0.8 and no worse than production."""
    values: dict[str, object] = {
        "dataset_uri": dataset.as_uri(),
        "label_column": "label",
        "score_output": "probabilities",
        "slice_column": "country",
        "thresholds": [
            rpb.MetricThreshold(metric="auc", min_value=0.8, max_regression=0.02, max_relative_regression=0.05),
            rpb.MetricThreshold(metric="logloss", max_value=0.6),
        ],
    }
    return rpb.BacktestGate(**{**values, **fields})  # type: ignore[arg-type]


def upload(
    stub: pb_grpc.ModelManagerServiceStub,
    model: str,
    content: bytes,
    sig: rpb.ModelSignature | None = None,
    metadata: tuple[tuple[str, str], ...] = (),
) -> int:
    """Register `content` as the next version of `model` (created first if new); its version number."""
    try:
        stub.GetModel(pb.GetModelRequest(name=model))
    except grpc.RpcError:
        stub.CreateModel(pb.CreateModelRequest(model=rpb.Model(name=model, owner="risk")), metadata=metadata)
    meta = pb.UploadModelVersionMetadata(
        model_name=model,
        format=rpb.MODEL_FORMAT_ONNX,
        expected_sha256=hashlib.sha256(content).hexdigest(),
        expected_size_bytes=len(content),
        signature=sig or signature(),
    )
    messages = [pb.UploadModelVersionRequest(metadata=meta), pb.UploadModelVersionRequest(chunk=content)]
    return int(stub.UploadModelVersion(iter(messages), metadata=metadata).model_version.version)


def wait_done(stub: pb_grpc.ModelManagerServiceStub, operation_id: str, timeout_s: float = 120.0) -> rpb.Operation:
    """Poll the operation until it is done (a generous deadline, not a performance claim)."""
    deadline = time.monotonic() + timeout_s
    while True:
        operation = stub.GetOperation(pb.GetOperationRequest(operation_id=operation_id)).operation
        if operation.done:
            return operation
        assert time.monotonic() < deadline, f"operation not done after {timeout_s}s: {operation}"
        time.sleep(0.05)
