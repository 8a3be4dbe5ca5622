"""Michelangelo's decision template (accuracy +2%, latency regression under 10%, business KPI +5%) on constructed
statistics: which action, and which checks pass, fail, or fail conclusively."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
from google.protobuf.duration_pb2 import Duration

from experiment_service.analysis import ArmData, analyse
from experiment_service.sufficient import SufficientStats
from fresco.api.experiments.v1 import experiment_pb2 as pb
from fresco.api.experiments.v1 import results_pb2

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
SHIP = pb.DECISION_ACTION_SHIP_TREATMENT
KEEP = pb.DECISION_ACTION_KEEP_CONTROL
CONTINUE = pb.DECISION_ACTION_CONTINUE


def michelangelo(arms: int = 2, **fields) -> pb.Experiment:
    names = ["control", "treatment", "treatment-b"][:arms]
    weights = [90.0, 10.0, 10.0][:arms]
    experiment = pb.Experiment(
        key="ranker-v7",
        arms=[
            pb.Arm(name=n, weight=w, model_version=i + 1) for i, (n, w) in enumerate(zip(names, weights, strict=True))
        ],
        metrics=[
            pb.MetricSpec(
                name="accuracy",
                role=pb.METRIC_ROLE_SUCCESS,
                kind=pb.METRIC_KIND_PROPORTION,
                minimum_detectable_effect=0.02,
            ),
            pb.MetricSpec(
                name="latency_ms",
                role=pb.METRIC_ROLE_LATENCY,
                kind=pb.METRIC_KIND_MEAN,
                direction=pb.METRIC_DIRECTION_DECREASE,
            ),
            pb.MetricSpec(
                name="revenue", role=pb.METRIC_ROLE_SUCCESS, kind=pb.METRIC_KIND_MEAN, minimum_detectable_effect=0.05
            ),
        ],
        min_units_per_arm=10_000,
        max_duration=Duration(seconds=14 * 86_400),
        phases=[pb.Phase(number=1, weights=weights)],
        **fields,
    )
    return experiment


def mean_stats(n: int, mean: float, sd: float) -> SufficientStats:
    """Statistics of n values with exactly this mean and sample standard deviation."""
    return SufficientStats(n=n, sx=n * mean, sxx=(n - 1) * sd * sd + n * mean * mean)


def proportion_stats(n: int, p: float) -> SufficientStats:
    k = round(n * p)
    return SufficientStats(n=n, sx=k, sxx=k)


def arm(name: str, n: int, accuracy: float, latency: float, revenue: float, revenue_sd: float = 4.0) -> ArmData:
    metrics = {
        "accuracy": proportion_stats(n, accuracy),
        "latency_ms": mean_stats(n, latency, 30.0),
        "revenue": mean_stats(n, revenue, revenue_sd),
    }
    return ArmData(name, metrics, {0: n})


CONTROL = arm("control", 90_000, 0.80, 100.0, 10.0)


def run(experiment: pb.Experiment, *arms: ArmData, days: float = 7) -> results_pb2.ExperimentResults:
    return analyse(experiment, 1, [CONTROL, *arms], days * 86_400, NOW)


def checks(results: results_pb2.ExperimentResults, arm_name: str = "treatment") -> dict[str, results_pb2.DecisionCheck]:
    return {
        c.criterion.metric or pb.CriterionKind.Name(c.criterion.kind): c
        for c in results.decision.checks
        if c.arm_name == arm_name
    }


def test_the_default_template_ships_a_treatment_that_passes_every_criterion() -> None:
    # Accuracy +3.75%, latency +1%, revenue +8%, each estimated precisely.
    results = run(michelangelo(), arm("treatment", 10_000, 0.83, 101.0, 10.8))
    assert results.decision.action == SHIP
    assert results.decision.arm == "treatment"
    by_name = checks(results)
    assert sorted(by_name) == sorted(
        ["accuracy", "latency_ms", "revenue", "CRITERION_KIND_MIN_UNITS", "CRITERION_KIND_NO_SAMPLE_RATIO_MISMATCH"]
    )
    assert all(c.passed for c in by_name.values())
    assert by_name["accuracy"].threshold == 0.02
    assert by_name["accuracy"].value == results.metrics[0].comparisons[0].relative_lift
    assert by_name["revenue"].threshold == 0.05
    # Latency: the value is the worst plausible regression (the sequence's upper end), under the default 10%.
    assert by_name["latency_ms"].threshold == 0.10
    assert by_name["latency_ms"].value == results.metrics[1].comparisons[0].sequential_interval.upper
    assert 0.01 < by_name["latency_ms"].value < 0.10
    assert by_name["CRITERION_KIND_MIN_UNITS"].value == 10_000
    assert results.metrics[1].comparisons[0].non_inferior


def test_a_significantly_worse_business_kpi_keeps_control() -> None:
    results = run(michelangelo(), arm("treatment", 10_000, 0.83, 101.0, 9.5))
    assert results.decision.action == KEEP
    assert results.decision.reason == "every treatment failed a criterion conclusively (treatment: revenue)"
    revenue = checks(results)["revenue"]
    assert not revenue.passed
    assert revenue.conclusive
    assert revenue.value < 0
    assert checks(results)["accuracy"].passed


def test_a_latency_regression_beyond_the_margin_keeps_control() -> None:
    results = run(michelangelo(), arm("treatment", 10_000, 0.83, 125.0, 10.8))
    assert results.decision.action == KEEP
    latency = checks(results)["latency_ms"]
    assert not latency.passed
    assert latency.conclusive
    assert latency.value > 0.2
    assert not results.metrics[1].comparisons[0].non_inferior


def test_an_inconclusive_treatment_continues_until_the_maximum_duration() -> None:
    # Revenue +3% with a wide interval: neither significant nor futile.
    treatment = arm("treatment", 10_000, 0.83, 101.0, 10.3, revenue_sd=20.0)
    results = run(michelangelo(), treatment)
    assert results.decision.action == CONTINUE
    revenue = checks(results)["revenue"]
    assert not revenue.passed
    assert not revenue.conclusive
    # Past 14 days nothing continues: no ship means keep control.
    late = run(michelangelo(), treatment, days=15)
    assert late.decision.action == KEEP
    assert "maximum duration" in late.decision.reason


def test_too_few_units_continue_whatever_the_effects() -> None:
    results = run(michelangelo(), arm("treatment", 5_000, 0.9, 90.0, 9.0))
    assert results.decision.action == CONTINUE
    assert "10000 units" in results.decision.reason
    units = checks(results)["CRITERION_KIND_MIN_UNITS"]
    assert (units.value, units.threshold, units.passed, units.conclusive) == (5_000, 10_000, False, False)
    # The revenue drop is conclusive already, but nothing but CONTINUE is decided before the minimum sample.
    assert checks(results)["revenue"].conclusive


def test_a_sample_ratio_mismatch_blocks_shipping() -> None:
    # 90/10 weights, but the treatment got 12,000 units next to control's 90,000.
    results = run(michelangelo(), arm("treatment", 12_000, 0.83, 101.0, 10.8))
    assert results.sample_ratio.mismatch
    assert results.decision.action == CONTINUE
    assert "sample-ratio mismatch" in results.decision.reason
    srm = checks(results)["CRITERION_KIND_NO_SAMPLE_RATIO_MISMATCH"]
    assert not srm.passed
    assert srm.threshold == 0.001
    assert srm.value < 0.001
    assert all(c.passed for name, c in checks(results).items() if name != "CRITERION_KIND_NO_SAMPLE_RATIO_MISMATCH")


def test_of_two_passing_treatments_the_one_with_the_larger_accuracy_lift_ships() -> None:
    experiment = michelangelo(arms=3)
    experiment.phases[0].weights[:] = [80.0, 10.0, 10.0]
    control = arm("control", 80_000, 0.80, 100.0, 10.0)
    better = arm("treatment-b", 10_000, 0.85, 100.0, 10.8)
    results = analyse(experiment, 1, [control, arm("treatment", 10_000, 0.83, 100.0, 11.0), better], 86_400, NOW)
    assert results.decision.action == SHIP
    assert results.decision.arm == "treatment-b"
    assert all(c.passed for c in results.decision.checks)


def test_explicit_criteria_replace_the_template() -> None:
    rule = pb.DecisionRule(criteria=[pb.Criterion(kind=pb.CRITERION_KIND_MIN_LIFT, metric="revenue", threshold=0.10)])
    results = run(michelangelo(decision_rule=rule), arm("treatment", 10_000, 0.83, 101.0, 10.8))
    # Only the one criterion is checked; +8% with an interval wholly below +10% is futile.
    assert [c.criterion.metric for c in results.decision.checks] == ["revenue"]
    assert results.decision.checks[0].conclusive
    assert results.decision.action == KEEP
    unknown = pb.DecisionRule(criteria=[pb.Criterion(kind=pb.CRITERION_KIND_MIN_LIFT, metric="clicks")])
    results = run(michelangelo(decision_rule=unknown), arm("treatment", 10_000, 0.83, 101.0, 10.8))
    assert "does not measure" in results.decision.checks[0].detail
    assert results.decision.action == CONTINUE


def test_fixed_horizon_decides_on_the_narrower_fixed_interval() -> None:
    # Revenue +6% with sd 24: the fixed 95% interval excludes 0, the always-valid sequence does not.
    treatment = arm("treatment", 10_000, 0.83, 101.0, 10.6, revenue_sd=24.0)
    sequential = run(michelangelo(), treatment)
    comparison = sequential.metrics[2].comparisons[0]
    assert comparison.interval.lower > 0 > comparison.sequential_interval.lower
    assert sequential.decision.action == CONTINUE
    fixed = run(michelangelo(statistics=pb.StatisticsSettings(fixed_horizon=True)), treatment)
    assert fixed.metrics[2].comparisons[0].significant
    assert fixed.decision.action == SHIP


def test_the_maximum_duration_counts_from_the_experiment_start() -> None:
    experiment = michelangelo()
    experiment.started_at.FromDatetime(NOW - timedelta(days=20))
    treatment = arm("treatment", 10_000, 0.83, 101.0, 10.3, revenue_sd=20.0)
    # The phase has run one day, the experiment twenty.
    assert run(experiment, treatment, days=1).decision.action == KEEP


def test_aa_runs_through_analyse_rarely_ship_and_real_improvements_do() -> None:
    # End to end through analyse at the planned sample, 50/50: an A/A experiment must not ship (both success
    # metrics would need a false positive, so ~0 of 300 runs), a treatment 2× better than the MDEs must ship.
    rng = np.random.default_rng(12)
    experiment = michelangelo()
    experiment.phases[0].weights[:] = [50.0, 50.0]
    n, runs = 10_000, 300
    shipped = {0.0: 0, 1.0: 0}
    for lift in shipped:
        for _ in range(runs):
            arms = []
            for name, factor in (("control", 0.0), ("treatment", lift)):
                accuracy = rng.binomial(n, 0.80 * (1 + 0.04 * factor)) / n
                latency = rng.normal(100.0, 30.0 / np.sqrt(n))
                revenue = rng.normal(10.0 * (1 + 0.10 * factor), 4.0 / np.sqrt(n))
                arms.append(
                    ArmData(
                        name,
                        {
                            "accuracy": proportion_stats(n, accuracy),
                            "latency_ms": mean_stats(n, latency, 30.0),
                            "revenue": mean_stats(n, revenue, 4.0),
                        },
                        {0: n},
                    )
                )
            action = analyse(experiment, 1, arms, 86_400, NOW).decision.action
            shipped[lift] += action == SHIP
    assert shipped[0.0] <= 3
    assert shipped[1.0] >= 0.9 * runs
