"""The demo's model versions: v2 is better than v1 on held-out rows; v3 loads and warms up but fails on live rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument

from fresco.training import (
    ExportedModel,
    demo_dataset,
    evaluate,
    train_better_classifier,
    train_classifier,
    write_failing_model,
    write_holdout,
)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def v1(models_dir: Path) -> ExportedModel:
    return train_classifier(models_dir)


def session(model: ExportedModel) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 4  # v3's failures are expected here; keep ORT's own log quiet
    return ort.InferenceSession(str(model.path), options, providers=["CPUExecutionProvider"])


def test_v2_scores_at_least_as_well_as_v1_on_held_out_rows(models_dir: Path, v1: ExportedModel) -> None:
    v2 = train_better_classifier(models_dir)
    assert (v2.name, v2.version, v2.path) == ("demo", 2, models_dir / "demo" / "2" / "model.onnx")
    data = demo_dataset()
    first = evaluate(v1.path, data.holdout_features, data.holdout_labels)
    second = evaluate(v2.path, data.holdout_features, data.holdout_labels)
    assert second["auc"] >= first["auc"]
    assert second["logloss"] <= first["logloss"]
    assert second["accuracy"] >= first["accuracy"]
    # Both serve the same contract, so a canary can split traffic between them.
    assert [i.name for i in session(v2).get_inputs()] == [i.name for i in session(v1).get_inputs()]
    assert [o.name for o in session(v2).get_outputs()] == ["label", "probabilities"]


def test_the_held_out_rows_are_not_trained_on() -> None:
    data = demo_dataset()
    assert (len(data.train_features), len(data.holdout_features)) == (2000, 1000)
    trained = {row.tobytes() for row in data.train_features}
    assert not any(row.tobytes() in trained for row in data.holdout_features)
    assert np.array_equal(demo_dataset().holdout_features, data.holdout_features)  # the same rows every time


def test_v3_loads_and_answers_zeros_like_v1(models_dir: Path, v1: ExportedModel) -> None:
    v3 = write_failing_model(v1, models_dir)
    assert (v3.version, v3.path) == (3, models_dir / "demo" / "3" / "model.onnx")
    bad, good = session(v3), session(v1)
    assert [(o.name, o.type) for o in bad.get_outputs()] == [(o.name, o.type) for o in good.get_outputs()]
    zeros = {v1.input_name: np.zeros((4, len(v1.feature_names)), dtype=np.float32)}  # the predictor's warm-up
    for answer, expected in zip(bad.run(None, zeros), good.run(None, zeros), strict=True):
        np.testing.assert_array_equal(answer, expected)


def test_v3_fails_with_a_server_error_on_most_typical_rows(models_dir: Path, v1: ExportedModel) -> None:
    v3 = write_failing_model(v1, models_dir)
    bad, good = session(v3), session(v1)
    rows = demo_dataset().holdout_features[:200]
    failures: list[str] = []
    for row in rows:
        feed = {v1.input_name: row[None, :]}
        try:
            answer = bad.run(None, feed)
        except Fail as err:  # ORT's FAIL, which the predictor answers as a server error
            failures.append(str(err))
        except InvalidArgument:  # would be a caller's error, which never counts against a canary
            pytest.fail("v3 must fail as a server error, not as invalid input")
        else:
            np.testing.assert_array_equal(answer[1], good.run(None, feed)[1])
    failed = len(failures)
    assert all("GatherElements" in failure for failure in failures)
    assert failed >= len(rows) // 2
    assert failed < len(rows)  # some rows still pass, so the failure is partial as on live traffic


def test_the_held_out_rows_as_parquet_for_a_backtest(tmp_path: Path) -> None:
    table = pq.read_table(write_holdout(tmp_path / "holdout.parquet"))
    data = demo_dataset()
    assert table.column_names == [f"f{i}" for i in range(8)] + ["label"]
    features = np.column_stack([table.column(f"f{i}").to_numpy() for i in range(8)])
    np.testing.assert_array_equal(features, data.holdout_features)
    np.testing.assert_array_equal(table.column("label").to_numpy(), data.holdout_labels)
