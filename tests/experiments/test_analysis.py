"""analyse() fills every field of ExperimentResults, agrees with compare_point, follows bandit allocations in its
sample-ratio check and names the field of bad input."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import pytest

from experiment_service import bandit
from experiment_service.analysis import ArmData, analyse, compare_point
from experiment_service.sufficient import SufficientStats
from fresco.api.experiments.v1 import experiment_pb2 as pb

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def experiment(**fields) -> pb.Experiment:
    return pb.Experiment(
        key="checkout",
        version=4,
        arms=[pb.Arm(name="a", weight=1, model_version=3), pb.Arm(name="b", weight=1, model_version=4)],
        metrics=[
            pb.MetricSpec(name="converted", kind=pb.METRIC_KIND_PROPORTION, minimum_detectable_effect=0.05),
            pb.MetricSpec(name="spend", kind=pb.METRIC_KIND_MEAN, minimum_detectable_effect=0.02, cuped=pb.Cuped()),
            pb.MetricSpec(name="ctr", kind=pb.METRIC_KIND_RATIO, role=pb.METRIC_ROLE_GUARDRAIL),
        ],
        min_units_per_arm=1_000,
        phases=[pb.Phase(number=1, weights=[1, 1])],
        **fields,
    )


def simulated_arm(rng: np.random.Generator, name: str, n: int, lift: float) -> ArmData:
    prior = rng.gamma(2.0, 5.0, n)
    prior[rng.random(n) < 0.25] = np.nan
    spend = (1 + lift) * (3.0 + 0.5 * np.nan_to_num(prior, nan=10.0)) + rng.normal(0, 3, n)
    sessions = rng.poisson(3, n) + 1
    return ArmData(
        name,
        {
            "converted": SufficientStats.from_values(rng.random(n) < 0.2 * (1 + lift)),
            "spend": SufficientStats.from_values(spend, prior),
            "ctr": SufficientStats.from_values(rng.binomial(sessions, 0.1), sessions),
        },
        {0: n},
    )


def test_every_field_is_filled() -> None:
    rng = np.random.default_rng(1)
    arms = [simulated_arm(rng, "a", 5_000, 0.0), simulated_arm(rng, "b", 5_050, 0.1)]
    results = analyse(experiment(), 1, arms, 3_600.0, NOW)
    assert (results.experiment_key, results.experiment_version, results.phase) == ("checkout", 4, 1)
    assert results.computed_at.ToDatetime(tzinfo=UTC) == NOW
    assert results.control_arm == "a"
    assert results.running_for_seconds == 3_600.0
    assert [(a.arm_name, a.units, a.weight, a.model_version) for a in results.arms] == [
        ("a", 5_000, 0.5, 3),
        ("b", 5_050, 0.5, 4),
    ]
    assert sum(a.probability_best for a in results.arms) == pytest.approx(1.0)
    assert results.arms[1].probability_best > 0.99

    converted, spend, ctr = results.metrics
    assert [m.metric_name for m in results.metrics] == ["converted", "spend", "ctr"]
    summary = spend.arms[1]
    stats = arms[1].metrics["spend"]
    assert (summary.units, summary.sum, summary.sum_squares) == (stats.n, stats.sx, stats.sxx)
    assert (summary.denominator_sum, summary.denominator_sum_squares, summary.cross_sum) == (
        stats.sy,
        stats.syy,
        stats.sxy,
    )
    assert summary.mean == pytest.approx(stats.sx / stats.n)
    assert summary.variance == pytest.approx((stats.sxx - stats.sx**2 / stats.n) / (stats.n - 1))
    assert summary.adjusted_mean != summary.mean
    assert summary.units_with_covariate == stats.n_y
    assert 0.7 * stats.n < stats.n_y < 0.8 * stats.n

    comparison = spend.comparisons[0]
    assert comparison.arm_name == "b"
    assert comparison.cuped_applied
    assert 0.3 < comparison.variance_reduction < 0.9
    assert comparison.relative_lift == pytest.approx(0.1, abs=0.02)
    assert comparison.absolute_effect == pytest.approx(summary.adjusted_mean - spend.arms[0].adjusted_mean)
    assert comparison.interval.lower < comparison.relative_lift < comparison.interval.upper
    assert comparison.sequential_interval.lower < comparison.interval.lower
    assert comparison.sequential_interval.upper > comparison.interval.upper
    assert comparison.significant
    assert comparison.p_value < comparison.sequential_p_value < 0.05
    assert comparison.probability_to_beat_control > 0.99
    assert spend.power.minimum_detectable_effect == 0.02
    assert spend.power.required_units_per_arm > 0
    assert 0 < spend.power.achieved_power < 1

    assert not converted.comparisons[0].cuped_applied
    assert converted.arms[0].variance == pytest.approx(converted.arms[0].mean * (1 - converted.arms[0].mean))
    # The ratio guardrail: Σx/Σy per arm, non-inferior within the default 10% margin.
    assert ctr.arms[0].mean == pytest.approx(arms[0].metrics["ctr"].sx / arms[0].metrics["ctr"].sy)
    assert ctr.comparisons[0].non_inferior == (ctr.comparisons[0].sequential_interval.lower > -0.10)
    assert ctr.power.minimum_detectable_effect == 0.10

    assert [(c.arm_name, c.expected_units, c.observed_units) for c in results.sample_ratio.arms] == [
        ("a", 5_025.0, 5_000),
        ("b", 5_025.0, 5_050),
    ]
    assert not results.sample_ratio.mismatch
    assert results.sample_ratio.p_value > 0.1
    # Conversions and spend pass; the noisy ratio guardrail cannot yet rule out a 10% regression.
    assert len(results.decision.checks) == 5
    assert [c.criterion.metric for c in results.decision.checks if not c.passed] == ["ctr"]
    assert results.decision.action == pb.DECISION_ACTION_CONTINUE
    assert results.SerializeToString()


def test_compare_point_agrees_with_analyse() -> None:
    rng = np.random.default_rng(2)
    arms = [simulated_arm(rng, "a", 3_000, 0.0), simulated_arm(rng, "b", 3_000, 0.03)]
    results = analyse(experiment(), 1, arms, 60.0, NOW)
    for metric in results.metrics:
        point = compare_point(
            experiment(), metric.metric_name, arms[0].metrics[metric.metric_name], arms[1].metrics[metric.metric_name]
        )
        c = metric.comparisons[0]
        assert point == pytest.approx((c.relative_lift, c.sequential_interval.lower, c.sequential_interval.upper))
    with pytest.raises(ValueError, match="metric_name 'nope'"):
        compare_point(experiment(), "nope", SufficientStats(), SufficientStats())


def test_units_without_outcomes_count_as_zeros() -> None:
    # 1,000 exposed units, 100 of which converted: the statistics only saw the 100.
    arms = [
        ArmData("a", {"converted": SufficientStats(n=100, sx=100, sxx=100)}, {0: 1_000}),
        ArmData("b", {"converted": SufficientStats(n=150, sx=150, sxx=150)}, {0: 1_000}),
    ]
    results = analyse(experiment(), 1, arms, 60.0, NOW)
    summary = results.metrics[0].arms[0]
    assert (summary.units, summary.mean) == (1_000, 0.1)
    assert results.metrics[0].comparisons[0].relative_lift == pytest.approx(0.5)
    # A metric with no statistics at all is a mean of zeros: nothing to compare, nothing crashes.
    spend = results.metrics[1]
    assert spend.arms[0].units == 1_000
    assert spend.comparisons[0].p_value == 1.0
    assert math.isinf(spend.comparisons[0].sequential_interval.upper)
    a, b = arms[0].metrics["converted"], arms[1].metrics["converted"]
    sequence = results.metrics[0].comparisons[0].sequential_interval
    assert compare_point(experiment(), "converted", a, b, units=(1_000, 1_000)) == pytest.approx(
        (0.5, sequence.lower, sequence.upper)
    )


def test_an_empty_phase_continues_without_alarms() -> None:
    results = analyse(experiment(), 1, [], 0.0, NOW)
    assert [a.units for a in results.arms] == [0, 0]
    assert [a.probability_best for a in results.arms] == [0.5, 0.5]
    # Three arms, no conversions anywhere yet: a tie, shared.
    three = experiment()
    three.arms.append(pb.Arm(name="c", weight=1))
    three.phases[0].weights.append(1)
    tied = [ArmData(name, {}, {0: 100}) for name in "abc"]
    assert [a.probability_best for a in analyse(three, 1, tied, 0.0, NOW).arms] == pytest.approx([1 / 3] * 3)
    assert not results.sample_ratio.mismatch
    assert results.decision.action == pb.DECISION_ACTION_CONTINUE
    assert results.metrics[0].comparisons[0].sequential_p_value == 1.0


def test_bandit_sample_ratio_follows_the_weights_of_each_allocation() -> None:
    bandit = experiment(type=pb.EXPERIMENT_TYPE_BANDIT, bandit=pb.BanditSettings(reward_metric="converted"))
    weights = {0: (0.5, 0.5), 1: (0.8, 0.2)}
    # 2,000 units at 50/50, then 10,000 at 80/20: in total 9,000 against 3,000, which is right.
    arms = [ArmData("a", {}, {0: 1_000, 1: 8_000}), ArmData("b", {}, {0: 1_000, 1: 2_000})]
    results = analyse(bandit, 2, arms, 60.0, NOW, weights_by_allocation=weights)
    assert [c.expected_units for c in results.sample_ratio.arms] == [9_000.0, 3_000.0]
    assert not results.sample_ratio.mismatch
    assert [a.weight for a in results.arms] == [0.8, 0.2]
    # Judged against the phase's starting 50/50 alone, the same units would be a glaring mismatch.
    flat = {0: (0.5, 0.5), 1: (0.5, 0.5)}
    assert analyse(bandit, 2, arms, 60.0, NOW, weights_by_allocation=flat).sample_ratio.mismatch
    skewed = [ArmData("a", {}, {0: 1_000, 1: 8_800}), ArmData("b", {}, {0: 1_000, 1: 1_200})]
    assert analyse(bandit, 2, skewed, 60.0, NOW, weights_by_allocation=weights).sample_ratio.mismatch


def test_a_bandits_probability_best_is_the_posterior_its_weights_come_from() -> None:
    settings = pb.BanditSettings(reward_metric="converted", min_arm_share=0.1, min_units_per_arm=50)
    bandit_experiment = experiment(type=pb.EXPERIMENT_TYPE_BANDIT, bandit=settings)
    stats = {"a": SufficientStats(n=300, sx=30, sxx=30), "b": SufficientStats(n=300, sx=45, sxx=45)}
    arms = [ArmData(name, {"converted": s}, {0: 100, 3: 200}) for name, s in stats.items()]
    results = analyse(bandit_experiment, 1, arms, 60.0, NOW, weights_by_allocation={0: (0.5, 0.5), 3: (0.3, 0.7)})
    rewards = [bandit.ArmReward(name, s.n, s.sx, s.sxx) for name, s in stats.items()]
    drawn = bandit.thompson(rewards, pb.METRIC_KIND_PROPORTION, pb.METRIC_DIRECTION_INCREASE, 0.1, 50,
                            bandit.seed_for(bandit_experiment.key, 1, 3))  # fmt: skip
    assert [a.probability_best for a in results.arms] == list(drawn.probability_best)
    assert results.arms[1].probability_best > 0.9  # 15% against 10% over 300 units each


def test_probability_best_of_three_arms_is_deterministic_and_follows_the_direction() -> None:
    three = experiment()
    del three.metrics[:]
    three.metrics.append(pb.MetricSpec(name="spend", kind=pb.METRIC_KIND_MEAN))
    three.arms.append(pb.Arm(name="c", weight=1))
    three.phases[0].weights.append(1)
    stats = [SufficientStats(n=2_000, sx=2_000 * m, sxx=2_000 * m * m + 1_999 * 4) for m in (10.0, 10.1, 10.15)]
    arms = [ArmData(name, {"spend": s}, {0: 2_000}) for name, s in zip("abc", stats, strict=True)]
    first = [a.probability_best for a in analyse(three, 1, arms, 0.0, NOW).arms]
    assert first == [a.probability_best for a in analyse(three, 1, arms, 0.0, NOW).arms]
    assert sum(first) == pytest.approx(1.0)
    assert first[2] > first[1] > first[0]
    # Closed form for the top two (arm a is ~never best): P(c > b) = Φ(0.05 / √(2·4/2000)).
    assert first[2] == pytest.approx(0.785, abs=0.02)
    three.metrics[0].direction = pb.METRIC_DIRECTION_DECREASE
    three.metrics.insert(
        0, pb.MetricSpec(name="spend", kind=pb.METRIC_KIND_MEAN, direction=pb.METRIC_DIRECTION_DECREASE)
    )
    lower_is_better = [a.probability_best for a in analyse(three, 1, arms, 0.0, NOW).arms]
    assert lower_is_better[0] > 0.9


def test_bad_input_names_the_field() -> None:
    with pytest.raises(ValueError, match="arms: \\['z'\\]"):
        analyse(experiment(), 1, [ArmData("z")], 0.0, NOW)
    with pytest.raises(ValueError, match="control_arm 'x'"):
        analyse(experiment(control_arm="x"), 1, [], 0.0, NOW)
    with pytest.raises(ValueError, match=r"statistics.alpha is 1.5"):
        analyse(experiment(statistics=pb.StatisticsSettings(alpha=1.5)), 1, [], 0.0, NOW)
    with pytest.raises(ValueError, match="allocation 3"):
        analyse(experiment(), 1, [ArmData("a", {}, {3: 10})], 0.0, NOW)
