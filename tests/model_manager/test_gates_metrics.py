"""Backtest metrics against values computed by hand, threshold checks (absolute, relative, per slice), output
compatibility with production, and the refusal of incomplete gate configurations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError
from sklearn.metrics import log_loss, roc_auc_score

from chassis.errors import InvalidArgument
from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager import gate_config, metrics
from model_manager.backtest import Scored
from model_manager.gate_schema import check_outputs
from model_manager.metrics import Evaluation
from model_manager.settings import ModelManagerSettings
from model_manager.thresholds import Baseline, Threshold, check_thresholds, thresholds_of


def a(*values: float) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def test_auc_by_hand() -> None:
    # Positives score 0.35 and 0.8, negatives 0.1 and 0.4: 3 of the 4 (positive, negative) pairs are ordered right.
    assert metrics.auc(a(0, 0, 1, 1), a(0.1, 0.4, 0.35, 0.8)) == pytest.approx(0.75)


def test_auc_counts_a_tie_as_half() -> None:
    # Pairs: (0.5 vs 0.5) tie = 0.5, (0.5 vs 0.2) = 1, (0.9 vs 0.5) = 1, (0.9 vs 0.2) = 1: 3.5 / 4.
    assert metrics.auc(a(0, 1, 0, 1), a(0.5, 0.5, 0.2, 0.9)) == pytest.approx(0.875)


def test_auc_agrees_with_scikit_learn_on_seeded_data() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 500).astype(np.float64)
    scores = np.round(rng.random(500) * 0.5 + labels * 0.3, 2)  # rounded: many ties
    assert metrics.auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    assert metrics.logloss(labels, scores) == pytest.approx(log_loss(labels, scores))


def test_auc_needs_both_labels() -> None:
    with pytest.raises(ValueError, match="both label values"):
        metrics.auc(a(1, 1), a(0.2, 0.3))


def test_accuracy_logloss_rmse_mae_by_hand() -> None:
    assert metrics.accuracy(a(0, 0, 1, 1), a(0.1, 0.4, 0.35, 0.8)) == pytest.approx(0.75)
    assert metrics.logloss(a(1, 0), a(0.8, 0.4)) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert metrics.rmse(a(1, 2, 3), a(2, 2, 5)) == pytest.approx(math.sqrt(5 / 3))
    assert metrics.mae(a(1, 2, 3), a(2, 2, 5)) == pytest.approx(1.0)


def test_calibration_bins_and_expected_error_by_hand() -> None:
    calibration = metrics.calibration(a(0, 1, 1, 1), a(0.05, 0.15, 0.95, 0.92))
    assert [(b.count, round(b.mean_predicted, 3), b.observed_rate) for b in calibration.bins] == [
        (1, 0.05, 0.0),
        (1, 0.15, 1.0),
        (2, 0.935, 1.0),
    ]
    assert (calibration.bins[2].lower, calibration.bins[2].upper) == pytest.approx((0.92, 0.95))
    # |0.05 - 0| + |0.15 - 1| + 2 * |0.935 - 1|, over 4 rows.
    assert calibration.expected_calibration_error == pytest.approx((0.05 + 0.85 + 0.13) / 4)
    assert calibration.brier_score == pytest.approx((0.05**2 + 0.85**2 + 0.05**2 + 0.08**2) / 4)


def test_a_score_of_exactly_one_lands_in_the_last_bin() -> None:
    calibration = metrics.calibration(a(1, 0), a(1.0, 0.0))
    assert [b.count for b in calibration.bins] == [1, 1]
    assert calibration.bins[-1].upper == 1.0


def test_evaluate_says_why_a_metric_is_missing() -> None:
    regression = metrics.evaluate(a(1.5, 2.0), a(1.0, 2.5))
    assert set(regression.metrics) == {"rmse", "mae"}
    assert regression.missing["auc"] == "needs 0/1 labels"
    margins = metrics.evaluate(a(0, 1), a(-2.0, 3.0))  # binary labels, scores not probabilities
    assert margins.metrics["auc"] == 1.0
    assert "probabilities" in margins.missing["logloss"]


def scored(auc: float, logloss: float, rows: int = 1000, slices: dict[str, tuple[int, float]] | None = None) -> Scored:
    def evaluation(n: int, value: float, loss: float) -> Evaluation:
        return Evaluation(n, {"auc": value, "logloss": loss}, None, {})

    by_slice = {key: evaluation(n, value, logloss) for key, (n, value) in (slices or {}).items()}
    return Scored(evaluation(rows, auc, logloss), by_slice)


def by_name(results: list[rpb.GateResult]) -> dict[str, rpb.GateResult]:
    return {r.name: r for r in results}


def test_absolute_and_relative_limits_report_measured_against_threshold() -> None:
    limits = [
        Threshold("auc", True, min_value=0.8, max_regression=0.02, max_relative_regression=0.05),
        Threshold("logloss", False, max_value=0.6, max_regression=0.05),
    ]
    results = by_name(check_thresholds(limits, scored(0.74, 0.58), Baseline(3, scored(0.84, 0.50)), 100))
    assert not results["backtest.auc.min_value"].passed
    assert (results["backtest.auc.min_value"].measured_value, results["backtest.auc.min_value"].threshold) == (
        0.74,
        0.8,
    )
    regression = results["backtest.auc.max_regression"]
    assert not regression.passed
    assert regression.measured_value == pytest.approx(0.10)
    assert "production v3" in regression.detail
    relative = results["backtest.auc.max_relative_regression"]
    assert not relative.passed
    assert relative.measured_value == pytest.approx(0.10 / 0.84)
    assert results["backtest.logloss.max_value"].passed  # 0.58 <= 0.6
    loss = results["backtest.logloss.max_regression"]  # lower is better: 0.58 is 0.08 worse than 0.50
    assert not loss.passed
    assert loss.measured_value == pytest.approx(0.08)


def test_an_improvement_passes_the_relative_limits() -> None:
    limits = [Threshold("auc", True, max_regression=0.0, max_relative_regression=0.0)]
    results = check_thresholds(limits, scored(0.9, 0.3), Baseline(1, scored(0.85, 0.3)), 100)
    assert [r.passed for r in results] == [True, True]
    assert results[0].measured_value == pytest.approx(-0.05)


def test_without_production_relative_limits_say_so() -> None:
    results = check_thresholds([Threshold("auc", True, max_regression=0.01)], scored(0.7, 0.4), Baseline(0), 100)
    assert results[0].passed
    assert "no production version" in results[0].detail


def test_slices_with_enough_rows_are_checked_and_named() -> None:
    candidate = scored(0.85, 0.4, slices={"country=FR": (300, 0.71), "country=LU": (20, 0.2)})
    results = by_name(check_thresholds([Threshold("auc", True, min_value=0.8)], candidate, Baseline(0), 100))
    assert set(results) == {"backtest.auc.min_value", "backtest.auc[country=FR].min_value"}
    assert not results["backtest.auc[country=FR].min_value"].passed
    assert "country=FR (300 rows)" in results["backtest.auc[country=FR].min_value"].detail


def test_a_metric_that_cannot_be_computed_fails_with_the_reason() -> None:
    candidate = Scored(Evaluation(10, {"rmse": 0.1}, None, {"auc": "needs 0/1 labels"}), {})
    [result] = check_thresholds([Threshold("auc", True, min_value=0.5)], candidate, Baseline(0), 100)
    assert not result.passed
    assert result.detail.startswith("error: auc cannot be computed")


def test_the_legacy_metric_field_takes_its_direction_from_lower_is_better() -> None:
    gate = rpb.BacktestGate(metric="rmse", lower_is_better=True, max_value=1.0)
    gate.thresholds.add(metric="accuracy", min_value=0.9)
    assert thresholds_of(gate) == [
        Threshold("rmse", False, max_value=1.0),
        Threshold("accuracy", True, min_value=0.9),
    ]


@pytest.mark.parametrize(
    ("gates", "message"),
    [
        (rpb.PromotionGates(backtest=rpb.BacktestGate(label_column="y", metric="auc")), "gates.backtest.dataset_uri"),
        (
            rpb.PromotionGates(backtest=rpb.BacktestGate(dataset_uri="file:///d", label_column="y", metric="f1")),
            "gates.backtest.metric: expected one of auc",
        ),
        (
            rpb.PromotionGates(backtest=rpb.BacktestGate(dataset_uri="file:///d", label_column="y")),
            "gates.backtest: expected metric or thresholds",
        ),
        (
            rpb.PromotionGates(
                backtest=rpb.BacktestGate(dataset_uri="file:///d", label_column="y", metric="auc", dataset_sha256="xy")
            ),
            "gates.backtest.dataset_sha256: expected 64 hexadecimal digits",
        ),
        (
            rpb.PromotionGates(
                backtest=rpb.BacktestGate(
                    dataset_uri="file:///d", label_column="y", thresholds=[rpb.MetricThreshold(metric="auc")]
                )
            ),
            "gates.backtest.thresholds[0]: expected at least one of min_value",
        ),
        (rpb.PromotionGates(latency=rpb.LatencyGate()), "gates.latency.p99_budget_ms: expected a budget above 0"),
        (
            rpb.PromotionGates(latency=rpb.LatencyGate(p99_budget_ms=5, sample_requests=-1)),
            "gates.latency.sample_requests",
        ),
    ],
)
def test_incomplete_gates_are_refused_naming_the_field(gates: rpb.PromotionGates, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("[", r"\[").replace("]", r"\]")):
        gate_config.chosen(gates, rpb.PromotionGates())


def test_server_defaults_parse_from_json_and_are_checked() -> None:
    defaults = gate_config.parse_defaults('{"schema": {"checkFeatureRefs": true}}')
    assert defaults.schema.check_feature_refs
    assert not defaults.HasField("backtest")
    assert gate_config.chosen(None, defaults) is defaults
    with pytest.raises(InvalidArgument, match="default_gates_json"):
        gate_config.parse_defaults('{"latency": {}}')


def test_the_manager_refuses_bad_default_gates_at_start() -> None:
    with pytest.raises(ValidationError, match=r"default_gates_json\.latency\.p99_budget_ms"):
        ModelManagerSettings(default_gates_json='{"latency": {}}')
    assert ModelManagerSettings().default_gates_json == '{"schema": {}, "drift": {}}'


def test_outputs_must_keep_the_production_names_types_and_shapes() -> None:
    production = rpb.ModelSignature(
        outputs=[
            rpb.TensorSpec(name="label", datatype="INT64", shape=[-1]),
            rpb.TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 2]),
        ]
    )
    same_plus_one = rpb.ModelSignature(outputs=[*production.outputs, rpb.TensorSpec(name="x", datatype="FP32")])
    assert check_outputs(same_plus_one, production, 4).passed
    assert check_outputs(rpb.ModelSignature(), None, 0).detail == "no production version to compare with"
    changed = rpb.ModelSignature(
        outputs=[
            rpb.TensorSpec(name="label", datatype="FP32", shape=[-1]),
            rpb.TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 3]),
        ]
    )
    result = check_outputs(changed, production, 4)
    assert not result.passed
    assert result.detail == (
        "output 'label' is FP32; production v4 has INT64; "
        "output 'probabilities' has shape [-1, 3]; production v4 has [-1, 2]"
    )
    assert "output 'label' of production v4 is missing" in check_outputs(rpb.ModelSignature(), production, 4).detail
