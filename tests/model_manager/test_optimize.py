"""OptimizeModelVersion and `fresco models optimize` end to end against a real model manager process: INT8 versions
registered with their parent in the lineage and the deltas in their report, what they report measured again here,
refusals over the accuracy budget that register nothing, and bad requests named by field."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest
from google.protobuf import json_format
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import to_onnx
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.neural_network import MLPClassifier

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as pb_grpc
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.suite import ServiceProcess
from tests.model_manager.gate_support import FEATURES, signature, upload

pytestmark = pytest.mark.integration

BUDGET = 0.01
ROWS = 1200


@dataclass(frozen=True)
class Trained:
    """An MLP classifier exported to ONNX, a logistic regression's weights and the held-out dataset."""

    mlp: bytes
    coefficients: np.ndarray
    intercept: float
    dataset: Path
    dataset_sha256: str


def train(directory: Path) -> Trained:
    """Both models on make_classification rows; the Parquet dataset of held-out rows (s0..s5 and label)."""
    features, labels = make_classification(n_samples=2 * ROWS, n_features=FEATURES, n_informative=4, random_state=11)
    features = features.astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlp = MLPClassifier((64, 64), max_iter=300, random_state=0).fit(features[:ROWS], labels[:ROWS])
        linear = LogisticRegression(max_iter=500).fit(features[:ROWS], labels[:ROWS])
    exported = to_onnx(mlp, features[:1], options={id(mlp): {"zipmap": False}}, target_opset=17)
    columns = {f"s{i}": features[ROWS:, i].astype(np.float64) for i in range(FEATURES)}
    columns["label"] = labels[ROWS:].astype(np.int64)
    path = directory / "backtest.parquet"
    pq.write_table(pa.table(columns), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return Trained(
        bytes(exported.SerializeToString()), linear.coef_.reshape(-1), float(linear.intercept_[0]), path, digest
    )


def fragile_model(trained: Trained) -> bytes:
    """A logistic regression's scores through weights a thousand times smaller, next to an unused weight of 1000 in
    the same tensor: exact in FP32, while INT8's one scale per tensor rounds every used weight to zero."""
    weights = np.zeros((FEATURES, 2), dtype=np.float32)
    weights[:, 0] = trained.coefficients * 1e-3
    weights[0, 1] = 1000.0
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["both"]),
        helper.make_node("Slice", ["both", "start", "end", "axis"], ["small"]),
        helper.make_node("Mul", ["small", "thousand"], ["logit0"]),
        helper.make_node("Add", ["logit0", "intercept"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["positive"]),
        helper.make_node("Sub", ["one", "positive"], ["negative"]),
        helper.make_node("Concat", ["negative", "positive"], ["probabilities"], axis=1),
    ]
    constants = [
        numpy_helper.from_array(weights, "W"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "start"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "end"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis"),
        numpy_helper.from_array(np.array(1000.0, dtype=np.float32), "thousand"),
        numpy_helper.from_array(np.array(trained.intercept, dtype=np.float32), "intercept"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
    ]
    model = helper.make_model(
        helper.make_graph(
            nodes,
            "fragile",
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, FEATURES])],
            [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])],
            constants,
        ),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=9,
    )
    return bytes(model.SerializeToString())


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("optimize")


@pytest.fixture(scope="module")
def models(root: Path) -> Trained:
    return train(root)


@pytest.fixture(scope="module")
def manager(root: Path, models: Trained) -> Iterator[ServiceProcess]:
    gate = rpb.BacktestGate(
        dataset_uri=models.dataset.as_uri(),
        dataset_sha256=models.dataset_sha256,
        label_column="label",
        score_output="probabilities",
        metric="auc",
        max_optimization_loss=BUDGET,
    )
    gates = json.dumps(json_format.MessageToDict(rpb.PromotionGates(backtest=gate)))
    args = ["--data-dir", str(root / "manager"), "--port", "0", "--metrics-port", "-1", "--default-gates-json", gates]
    process = ServiceProcess("model_manager", args).start()
    try:
        process.wait_healthy(60)
        yield process
    finally:
        assert process.stop() == 0, process.output()


@pytest.fixture(scope="module")
def stub(manager: ServiceProcess) -> Iterator[pb_grpc.ModelManagerServiceStub]:
    with grpc.insecure_channel(manager.address) as channel:
        yield pb_grpc.ModelManagerServiceStub(channel)


def optimize(
    stub: pb_grpc.ModelManagerServiceStub, model: str, version: int, **fields: object
) -> pb.OptimizeModelVersionResponse:
    method = fields.pop("method", pb.OPTIMIZATION_METHOD_INT8_DYNAMIC)
    request = pb.OptimizeModelVersionRequest(model_name=model, version=version, method=method, **fields)  # type: ignore[arg-type]
    return stub.OptimizeModelVersion(request, timeout=300)


def latest(stub: pb_grpc.ModelManagerServiceStub, model: str) -> int:
    return int(stub.GetModel(pb.GetModelRequest(name=model)).model.latest_version)


def auc_of(artifact: bytes, dataset: Path) -> float:
    table = pq.read_table(dataset)
    features = np.stack([table.column(f"s{i}").to_numpy() for i in range(FEATURES)], axis=1).astype(np.float32)
    session = ort.InferenceSession(artifact, providers=["CPUExecutionProvider"])
    scores = session.run(["probabilities"], {"X": features})[0][:, 1]
    return float(roc_auc_score(table.column("label").to_numpy(), scores))


def refused(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value


def test_dynamic_int8_is_registered_with_its_parent_and_the_deltas_it_measured(
    stub: pb_grpc.ModelManagerServiceStub, models: Trained
) -> None:
    parent = upload(stub, "churn_int8", models.mlp)
    response = optimize(stub, "churn_int8", parent, reason="smaller")
    version, report = response.model_version, response.report
    assert version.version == parent + 1 == latest(stub, "churn_int8")
    assert version.lineage.parent_version == parent
    assert version.labels["optimization"] == "int8-dynamic"
    assert report.method == pb.OPTIMIZATION_METHOD_INT8_DYNAMIC
    assert report.parent_version == parent
    assert report.size_bytes == version.size_bytes
    assert report.parent_size_bytes == len(models.mlp)
    assert report.rows == 1200
    assert report.dataset_sha256 == models.dataset_sha256
    # What the manager reports, measured again here on the registered bytes.
    artifact = Path(version.artifact_uri.removeprefix("file://")).read_bytes()
    assert len(artifact) == version.size_bytes
    assert report.metrics["auc"] == pytest.approx(auc_of(artifact, models.dataset), abs=1e-9)
    assert report.parent_metrics["auc"] == pytest.approx(auc_of(models.mlp, models.dataset), abs=1e-9)
    assert report.accuracy_loss == pytest.approx(report.parent_metrics["auc"] - report.metrics["auc"])
    assert report.accuracy_loss <= BUDGET == report.accuracy_loss_budget
    assert report.parent_latency_us > 0
    assert report.latency_us > 0
    assert report.cpu_us > 0
    assert any(
        n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in onnx.load_from_string(artifact).graph.node
    )
    stored = stub.GetModelVersion(pb.GetModelVersionRequest(model_name="churn_int8", version=version.version))
    parameters = stored.model_version.report.parameters
    assert parameters["optimization.parent_version"] == str(parent)
    assert float(parameters["optimization.size_ratio"]) == pytest.approx(len(artifact) / len(models.mlp), abs=1e-4)
    assert float(parameters["optimization.accuracy_loss"]) == pytest.approx(report.accuracy_loss, rel=1e-5, abs=1e-12)
    assert stored.model_version.report.evaluation_dataset_sha256 == models.dataset_sha256
    assert stored.model_version.signature == signature()


def test_static_int8_calibrates_on_the_rows_of_a_parquet_sample(
    stub: pb_grpc.ModelManagerServiceStub, models: Trained
) -> None:
    parent = upload(stub, "churn_static", models.mlp)
    response = optimize(
        stub,
        "churn_static",
        parent,
        method=pb.OPTIMIZATION_METHOD_INT8_STATIC,
        calibration_uri=str(models.dataset),
        calibration_rows=300,
    )
    assert response.report.calibration_rows == 300
    assert response.model_version.labels["optimization"] == "int8-static"
    artifact = Path(response.model_version.artifact_uri.removeprefix("file://")).read_bytes()
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load_from_string(artifact).graph.node)
    assert response.report.metrics["auc"] == pytest.approx(auc_of(artifact, models.dataset), abs=1e-9)


def test_a_loss_over_the_budget_is_refused_and_registers_nothing(
    stub: pb_grpc.ModelManagerServiceStub, models: Trained
) -> None:
    fragile = fragile_model(models)
    assert auc_of(fragile, models.dataset) > 0.8  # in FP32 it scores as the logistic regression does
    parent = upload(stub, "fragile", fragile)
    err = refused(lambda: optimize(stub, "fragile", parent))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "backtest.max_optimization_loss" in (err.details() or "")
    assert "Nothing was registered" in (err.details() or "")
    assert latest(stub, "fragile") == parent


def test_a_dry_run_reports_and_registers_nothing(stub: pb_grpc.ModelManagerServiceStub, models: Trained) -> None:
    parent = upload(stub, "churn_dry", models.mlp)
    response = optimize(stub, "churn_dry", parent, dry_run=True)
    assert not response.HasField("model_version")
    assert response.report.size_bytes < response.report.parent_size_bytes
    assert latest(stub, "churn_dry") == parent


def test_bad_requests_name_the_field(stub: pb_grpc.ModelManagerServiceStub, models: Trained) -> None:
    parent = upload(stub, "churn_bad", models.mlp)
    cases = [
        ({"method": pb.OPTIMIZATION_METHOD_UNSPECIFIED}, grpc.StatusCode.INVALID_ARGUMENT, "method"),
        ({"method": pb.OPTIMIZATION_METHOD_INT8_STATIC}, grpc.StatusCode.INVALID_ARGUMENT, "calibration_uri"),
        ({"calibration_uri": str(models.dataset)}, grpc.StatusCode.INVALID_ARGUMENT, "calibration_uri"),
        (
            {"method": pb.OPTIMIZATION_METHOD_INT8_STATIC, "calibration_uri": "/nowhere.parquet"},
            grpc.StatusCode.FAILED_PRECONDITION,
            "dataset_uri",
        ),
    ]
    for fields, code, field in cases:
        err = refused(lambda fields=fields: optimize(stub, "churn_bad", parent, **dict(fields)))  # type: ignore[misc]
        assert err.code() == code, (fields, err.details())
        assert field in (err.details() or ""), (fields, err.details())
    missing = refused(lambda: optimize(stub, "churn_bad", parent + 5))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert latest(stub, "churn_bad") == parent


def test_the_cli_prints_the_deltas_and_the_registered_version(manager: ServiceProcess, models: Trained) -> None:
    stub_channel = grpc.insecure_channel(manager.address)
    with stub_channel:
        parent = upload(pb_grpc.ModelManagerServiceStub(stub_channel), "churn_cli", models.mlp)
    env = {**os.environ, "COLUMNS": "200", "FRESCO_MODEL_MANAGER": manager.address}
    command = [sys.executable, "-m", "fresco.cli", "models", "optimize", "churn_cli", str(parent), "--int8"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert "size bytes" in done.stdout
    assert "auc" in done.stdout
    assert f"registered churn_cli v{parent + 1} (parent v{parent}" in done.stdout
    bad = subprocess.run(
        [*command[:-1], "--int8", "--static"], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert bad.returncode == 2
    assert "--calibration" in bad.stderr
