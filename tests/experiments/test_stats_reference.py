"""The statistics engine against independent references: scipy.stats, least squares and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from experiment_service import power, srm
from experiment_service.comparison import take
from experiment_service.cuped import cuped, variance_reduction
from experiment_service.frequentist import (
    Method,
    fixed_test,
    mean_moments,
    probability_better,
    proportion_moments,
    ratio_moments,
    relative_lift,
)
from experiment_service.sequential import (
    always_valid_p_value,
    boundary_multiplier,
    confidence_sequence,
    tuned_rho_squared,
)
from experiment_service.sufficient import SufficientStats


def moments_of(values: np.ndarray):
    s = SufficientStats.from_values(values)
    return mean_moments(s.n, s.sx, s.sxx)


def test_sufficient_stats_add_and_mark_missing_covariates() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0])
    y = np.array([0.5, np.nan, 1.5, np.nan])
    s = SufficientStats.from_values(x, y)
    assert (s.n, s.sx, s.sxx, s.n_y) == (4, 10.0, 30.0, 2)
    assert (s.sy, s.syy, s.sxy) == (2.0, 2.5, 0.5 + 4.5)
    both = SufficientStats.from_values(x[:2], y[:2]) + SufficientStats.from_values(x[2:], y[2:])
    assert both == s
    # Exposed units without outcomes are zeros: the sums stay, n grows; fewer units than counted change nothing.
    assert s.with_units(10) == SufficientStats(10, 10.0, 30.0, 2.0, 2.5, 5.0, 2)
    assert s.with_units(3) is s


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_welch_matches_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    control = rng.normal(10.0, 2.0, 40)
    treatment = rng.normal(11.0, 5.0, 25)
    test = fixed_test(moments_of(control), moments_of(treatment), 0.05, Method.WELCH)
    reference = stats.ttest_ind(treatment, control, equal_var=False)
    interval = reference.confidence_interval(0.95)
    assert float(test.p_value) == pytest.approx(reference.pvalue, rel=1e-9)
    assert float(test.effect) == pytest.approx(treatment.mean() - control.mean(), rel=1e-12)
    assert [float(v) for v in test.interval()] == pytest.approx([interval.low, interval.high], rel=1e-9)


def test_two_proportion_z_test_is_the_uncorrected_chi_square_test() -> None:
    # 120/1000 against 150/1000: z² equals Pearson's χ² of the 2×2 table, so the p-values agree.
    c, t = proportion_moments(1000, 120), proportion_moments(1000, 150)
    test = fixed_test(c, t, 0.05, Method.POOLED_Z)
    _, p_reference, _, _ = stats.chi2_contingency([[120, 880], [150, 850]], correction=False)
    assert float(test.p_value) == pytest.approx(p_reference, rel=1e-9)
    pooled = 270 / 2000
    z = 0.03 / math.sqrt(pooled * (1 - pooled) * (2 / 1000))
    assert float(test.p_value) == pytest.approx(2 * stats.norm.sf(z), rel=1e-12)
    # The interval uses the unpooled standard error.
    se = math.sqrt(0.12 * 0.88 / 1000 + 0.15 * 0.85 / 1000)
    assert float(test.interval()[0]) == pytest.approx(0.03 - stats.norm.ppf(0.975) * se, rel=1e-9)


def test_relative_lift_uses_the_delta_method() -> None:
    c, t = mean_moments(100, 1000.0, 100 * 100 + 99 * 4.0), mean_moments(400, 4400.0, 400 * 121 + 399 * 9.0)
    lift, se = relative_lift(c, t)
    # C̄ = 10, Var C̄ = 4/100; T̄ = 11, Var T̄ = 9/400.
    assert float(lift) == pytest.approx(0.1)
    assert float(se) == pytest.approx(math.sqrt(9 / 400 / 100 + 121 * (4 / 100) / 10_000))
    # A negative control keeps the lift's sign that of the difference; a zero control has no relative interval.
    neg_lift, _ = relative_lift(mean_moments(10, -10.0, 20.0), mean_moments(10, -5.0, 10.0))
    assert float(neg_lift) == pytest.approx(0.5)
    zero_lift, zero_se = relative_lift(mean_moments(10, 0.0, 2.0), t)
    assert (float(zero_lift), float(zero_se)) == (0.0, math.inf)


def test_ratio_variance_is_the_variance_of_the_linearised_unit_values() -> None:
    rng = np.random.default_rng(7)
    y = rng.poisson(4, 300) + 1.0
    x = rng.binomial(y.astype(int), 0.2).astype(float)
    s = SufficientStats.from_values(x, y)
    m = ratio_moments(s.n, s.sx, s.sxx, s.sy, s.syy, s.sxy)
    r = x.sum() / y.sum()
    linearised = (x - r * y) / y.mean()
    assert float(m.mean) == pytest.approx(r)
    assert float(m.var) == pytest.approx(linearised.var(ddof=1), rel=1e-9)


def test_cuped_equals_the_ancova_treatment_coefficient() -> None:
    rng = np.random.default_rng(11)
    y = rng.normal(5.0, 2.0, (2, 400))
    x = 1.0 + 0.7 * y + rng.normal(0.0, 1.0, (2, 400)) + np.array([[0.0], [0.3]])
    sums = [SufficientStats.from_values(x[a], y[a]) for a in range(2)]
    columns = [np.array([getattr(s, f) for s in sums]) for f in ("n", "sx", "sxx", "sy", "syy", "sxy")]
    adjusted = cuped(*columns)
    # x ~ 1 + treatment + y by least squares: its treatment coefficient is the CUPED difference.
    design = np.column_stack([np.ones(800), np.repeat([0.0, 1.0], 400), y.ravel()])
    coefficients, *_ = np.linalg.lstsq(design, x.ravel(), rcond=None)
    assert float(adjusted.theta) == pytest.approx(coefficients[2], rel=1e-9)
    effect = adjusted.adjusted.mean[1] - adjusted.adjusted.mean[0]
    assert float(effect) == pytest.approx(coefficients[1], rel=1e-9)
    # Residual variance share: 1 − R² of x on y within arms, about 1/(1 + 0.49·4) ≈ 0.34 here.
    assert float(variance_reduction(adjusted, 0, 1)) == pytest.approx(0.66, abs=0.05)
    assert float(take(adjusted.raw, 1).mean) == pytest.approx(x[1].mean())


def test_confidence_sequence_boundary_and_its_p_value_agree() -> None:
    alpha, planned = 0.05, 20_000
    rho2 = tuned_rho_squared(alpha, planned)
    # Hand value at n = n*: u = ρ²n* = −2 log α + log(1 − 2 log α).
    u = -2 * math.log(alpha) + math.log(1 - 2 * math.log(alpha))
    expected = math.sqrt((u + 1) / u * (math.log(u + 1) - 2 * math.log(alpha)))
    assert float(boundary_multiplier(planned, rho2, alpha)) == pytest.approx(expected)
    # Tuned ρ makes the boundary narrowest at n* (neighbouring ρ give wider sequences there).
    for factor in (0.7, 0.9, 1.1, 1.4):
        assert float(boundary_multiplier(planned, rho2 * factor, alpha)) > expected
    # Always wider than the fixed-horizon z, at every n.
    n = np.geomspace(10, 10**7, 50)
    assert np.all(boundary_multiplier(n, rho2, alpha) > stats.norm.ppf(1 - alpha / 2))
    # The sequence excludes 0 exactly when the always-valid p-value is below alpha.
    estimates = np.linspace(-0.05, 0.05, 201)
    lower, upper = confidence_sequence(estimates, 0.01, planned, rho2, alpha)
    p = always_valid_p_value(estimates, 0.01, planned, rho2)
    assert np.array_equal((lower > 0) | (upper < 0), p < alpha)
    assert float(always_valid_p_value(0.0, 0.01, planned, rho2)) == 1.0


def test_power_plan_by_hand() -> None:
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    # Mean 10, sd 5, a 5% effect: n = z²·2·25 / 0.5².
    n = power.required_units_per_arm(0.05, 0.8, 0.05, 10.0, 25.0, 25.0)
    assert n == math.ceil(z * z * 50 / 0.25)
    assert power.achieved_power(0.05, 0.05, 10.0, 25.0, 25.0, n, n) == pytest.approx(0.8, abs=0.002)
    assert power.achieved_power(0.05, 0.05, 10.0, 25.0, 25.0, n / 4, n / 4) < 0.3
    # A proportion uses the treatment's own variance: 10% → 11%.
    plan = power.plan(0.05, 0.8, 0.1, 0.1, 0.09, True, 0, 0)
    assert plan.required_units_per_arm == math.ceil(z * z * (0.09 + 0.11 * 0.89) / 0.01**2)
    assert plan.achieved_power == 0.0
    assert power.plan(0.05, 0.8, 0.0, 0.1, 0.09, True, 100, 100).required_units_per_arm == 0


def test_probability_better_is_the_normal_posterior() -> None:
    assert float(probability_better(1.0, 1.0, 1.0)) == pytest.approx(stats.norm.cdf(1.0))
    assert float(probability_better(1.0, 1.0, -1.0)) == pytest.approx(stats.norm.cdf(-1.0))
    assert float(probability_better(0.5, 0.0, 1.0)) == 1.0


def test_expected_units_follow_the_weights_of_each_allocation() -> None:
    # A bandit: 1,000 units under 50/50, then 2,000 under 80/20.
    units = [{0: 510, 1: 1590}, {0: 490, 1: 410}]
    expected = srm.expected_units(units, {0: [1, 1], 1: [0.8, 0.2]})
    assert expected == pytest.approx([500 + 1600, 500 + 400])
    with pytest.raises(ValueError, match="allocation 1"):
        srm.expected_units(units, {0: [1, 1]})


def test_sample_ratio_guards() -> None:
    chi2, p, deviation = srm.chi_square([9_600, 400], [9_500, 500])
    assert float(chi2) == pytest.approx(100**2 / 9_500 + 100**2 / 500)
    assert float(p) == pytest.approx(stats.chisquare([9_600, 400], [9_500, 500]).pvalue)
    assert float(deviation) == pytest.approx(0.2)
    assert srm.sample_ratio([9_600, 400], [9_500, 500], 0.001, 0.01).mismatch
    # Significant but tiny: 10 million units 0.3% off fire only without the minimum-deviation guard.
    big = ([5_015_000, 4_985_000], [5_000_000, 5_000_000])
    assert not srm.sample_ratio(*big, 0.001, 0.01).mismatch
    assert srm.sample_ratio(*big, 0.001, 0.001).mismatch
    # An arm expected to have units that has none fires; so does an arm of weight 0 that has some.
    assert srm.sample_ratio([12, 0], [6, 6], 0.001, 0.01).mismatch
    assert not srm.sample_ratio([7, 0], [3.5, 3.5], 0.001, 0.01).mismatch
    assert srm.sample_ratio([10, 1], [11, 0], 0.001, 0.01).mismatch
    assert not srm.sample_ratio([0, 0], [0, 0], 0.001, 0.01).mismatch
