"""The engine by simulation, seeded: false positives held at alpha (also under continuous peeking with the
confidence sequences), the stated power reached, SRM alarms where they belong, CUPED and ratio intervals that
cover. Runs simulate sufficient statistics directly where that is exact, so thousands of runs take a moment.

Each tolerance is several binomial standard errors wide (the seeds make every result fixed anyway), and each test
says what a broken method would give, so a pass means the method is right rather than lucky.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from experiment_service import power, srm
from experiment_service.comparison import contrast, excludes_zero
from experiment_service.cuped import cuped, variance_reduction
from experiment_service.frequentist import Method, Moments, fixed_test, mean_moments, proportion_moments, ratio_moments
from experiment_service.sequential import tuned_rho_squared

ALPHA = 0.05


def normal_sums(rng: np.random.Generator, n: int, mu: float, sigma: float, shape: tuple[int, ...]):
    """(Σx, Σx²) of n normal values per cell: the mean and the sample variance are independent (exact)."""
    mean = rng.normal(mu, sigma / np.sqrt(n), shape)
    s2 = sigma**2 * rng.chisquare(n - 1, shape) / (n - 1)
    return n * mean, (n - 1) * s2 + n * mean**2


def rate_within(rate: float, expected: float, runs: int, standard_errors: float = 4.0) -> bool:
    return abs(rate - expected) <= standard_errors * float(np.sqrt(expected * (1 - expected) / runs))


def test_aa_fixed_horizon_false_positive_rate_is_alpha() -> None:
    rng = np.random.default_rng(20261202)
    runs, n = 4_000, 1_000
    sx, sxx = normal_sums(rng, n, 10.0, 3.0, (2, runs))
    test = fixed_test(mean_moments(n, sx[0], sxx[0]), mean_moments(n, sx[1], sxx[1]), ALPHA, Method.WELCH)
    # Both the absolute test and the delta-method relative interval hold 5% ± 4 SE (±0.014); dropping one arm's
    # variance from the standard error would give ~17%.
    assert rate_within(float(np.mean(test.p_value < ALPHA)), ALPHA, runs)
    assert rate_within(float(np.mean(excludes_zero(test.lift_interval()))), ALPHA, runs)

    conversions = rng.binomial(2_000, 0.1, (2, runs))
    z = fixed_test(
        proportion_moments(2_000, conversions[0]), proportion_moments(2_000, conversions[1]), ALPHA, Method.POOLED_Z
    )
    assert rate_within(float(np.mean(z.p_value < ALPHA)), ALPHA, runs)


def peeking_rates(control: Moments, treatment: Moments, method: Method, planned: int) -> tuple[float, float]:
    """Share of runs that ever reject (looks on axis 1): with the confidence sequence, and with the fixed interval."""
    binary = method is Method.POOLED_Z
    c = contrast(control, treatment, method, ALPHA, tuned_rho_squared(ALPHA, planned), 1.0, binary)
    sequential = excludes_zero(c.sequential_interval).any(axis=1).mean()
    naive = excludes_zero(c.interval).any(axis=1).mean()
    return float(sequential), float(naive)


def test_aa_under_continuous_peeking_stays_below_alpha_with_the_confidence_sequence() -> None:
    rng = np.random.default_rng(7)
    runs, looks, batch = 2_000, 40, 250
    sx, sxx = normal_sums(rng, batch, 100.0, 30.0, (2, runs, looks))
    sx, sxx = sx.cumsum(axis=2), sxx.cumsum(axis=2)
    n = batch * np.arange(1, looks + 1, dtype=float)
    control, treatment = mean_moments(n, sx[0], sxx[0]), mean_moments(n, sx[1], sxx[1])
    sequential, naive = peeking_rates(control, treatment, Method.WELCH, 2 * batch * looks)
    # Looking 40 times at a fixed-horizon interval rejects a true null in ~31% of runs: the simulation can tell.
    assert naive > 0.15
    # The confidence sequence stays at or below alpha (~1.5% here; the fixed-horizon boundary gives ~31%).
    assert sequential <= ALPHA

    # Conversions on a 90/10 split, looked at after every 1,000 units.
    conversions_c = rng.binomial(900, 0.05, (runs, looks)).cumsum(axis=1)
    conversions_t = rng.binomial(100, 0.05, (runs, looks)).cumsum(axis=1)
    steps = np.arange(1, looks + 1, dtype=float)
    sequential, naive = peeking_rates(
        proportion_moments(900 * steps, conversions_c),
        proportion_moments(100 * steps, conversions_t),
        Method.POOLED_Z,
        2 * 100 * looks,
    )
    assert naive > 0.15
    assert sequential <= ALPHA


def test_ab_with_a_known_effect_reaches_the_planned_power() -> None:
    rng = np.random.default_rng(99)
    runs = 4_000
    # Mean metric: 10 → 10.5 (+5%), sd 5.
    n = power.required_units_per_arm(ALPHA, 0.8, 0.05, 10.0, 25.0, 25.0)
    sx_c, sxx_c = normal_sums(rng, n, 10.0, 5.0, (runs,))
    sx_t, sxx_t = normal_sums(rng, n, 10.5, 5.0, (runs,))
    test = fixed_test(mean_moments(n, sx_c, sxx_c), mean_moments(n, sx_t, sxx_t), ALPHA, Method.WELCH)
    # 80% ± 4 SE (±0.025): a calculator off by a factor 2 in n would give 52% or 98%.
    assert rate_within(float(np.mean(test.p_value < ALPHA)), 0.8, runs)

    # Proportion: 10% → 11%, the treatment's variance p_T(1 − p_T) in the plan.
    plan = power.plan(ALPHA, 0.8, 0.1, 0.1, 0.09, True, 0, 0)
    n = plan.required_units_per_arm
    c, t = rng.binomial(n, 0.10, runs), rng.binomial(n, 0.11, runs)
    z = fixed_test(proportion_moments(n, c), proportion_moments(n, t), ALPHA, Method.POOLED_Z)
    assert rate_within(float(np.mean(z.p_value < ALPHA)), 0.8, runs)
    assert power.achieved_power(ALPHA, 0.1, 0.1, 0.09, 0.11 * 0.89, n, n) >= 0.8


def test_srm_fires_on_a_biased_split_and_not_on_a_correct_95_5_split() -> None:
    rng = np.random.default_rng(5)
    expected = srm.expected_units([{0: 95_500}, {0: 4_500}], {0: [95, 5]})
    assert expected == [95_000.0, 5_000.0]
    treatment = rng.binomial(100_000, 0.05)
    assert not srm.sample_ratio([100_000 - treatment, treatment], expected, 0.001, 0.01).mismatch
    # The treatment loses 12% of its units (a crash before logging): 5,000 → ~4,400.
    biased = rng.binomial(100_000, 0.05 * 0.88)
    assert srm.sample_ratio([100_000 - biased, biased], expected, 0.001, 0.01).mismatch

    # Across many correct 95/5 runs the false-alarm rate is the p threshold (±6 SE = ±0.0003). Testing against an
    # equal split would alarm always; χ² with the wrong degrees of freedom (2) would give ~0.0002.
    runs, n = 400_000, 10_000
    t = rng.binomial(n, 0.05, runs).astype(float)
    observed = np.stack([n - t, t], axis=-1)
    alarms = srm.mismatch(observed, np.array([9_500.0, 500.0]), 0.001, 0.01)
    assert abs(float(alarms.mean()) - 0.001) < 0.0003
    assert srm.mismatch(observed[:1000], np.array([5_000.0, 5_000.0]), 0.001, 0.01).all()


def test_cuped_reduces_variance_and_stays_unbiased_with_missing_covariates() -> None:
    rng = np.random.default_rng(42)
    runs, n, effect = 2_000, 1_000, 0.1
    y_true = rng.normal(0.0, 1.0, (runs, 2, n))
    x = 2.0 + 0.8 * y_true + rng.normal(0.0, 0.6, (runs, 2, n))
    x[:, 1] += effect
    # 30% of units have no pre-exposure data: y = 0 for them.
    y = np.where(rng.random((runs, 2, n)) < 0.3, 0.0, y_true)
    sums = (np.full((runs, 2), float(n)), x.sum(-1), (x * x).sum(-1), y.sum(-1), (y * y).sum(-1), (x * y).sum(-1))
    adjusted = cuped(*sums)
    estimate = adjusted.adjusted.mean[:, 1] - adjusted.adjusted.mean[:, 0]
    raw = adjusted.raw.mean[:, 1] - adjusted.raw.mean[:, 0]
    # Unbiased: the mean estimate is the effect within 4 standard errors of the mean of 2,000 runs (±0.003, 3% of
    # the effect), although 30% of the covariates are missing.
    assert abs(estimate.mean() - effect) < 4 * estimate.std() / np.sqrt(runs)
    # Var(x) = 1, cov(x, y) = 0.56, var(y) = 0.7: the reduction is ρ² = 0.56²/0.7 = 0.448 (no adjustment: 0).
    reduction = variance_reduction(adjusted, 0, 1)
    assert abs(float(reduction.mean()) - 0.448) < 0.02
    assert 0.50 < estimate.var() / raw.var() < 0.61
    # The adjusted variance is the right one: 95% intervals cover the effect 95% ± 4 SE (using the raw variance
    # would cover ~99%, ignoring the control arm ~83%).
    a = adjusted.adjusted
    c = contrast(
        Moments(a.n[:, 0], a.mean[:, 0], a.var[:, 0]),
        Moments(a.n[:, 1], a.mean[:, 1], a.var[:, 1]),
        Method.Z,
        ALPHA,
        1.0,
        1.0,
    )
    lower, upper = c.fixed.interval()
    assert rate_within(float(np.mean((lower < effect) & (upper > effect))), 0.95, runs)


def test_ratio_delta_method_intervals_cover() -> None:
    rng = np.random.default_rng(3)
    runs, n = 2_000, 500
    sessions = rng.poisson(4.0, (runs, 2, n)) + 1.0
    # Users differ a lot in click rate (Beta(0.5, 4.5), mean 10%; treatment Beta(0.55, 4.45), mean 11%), so the
    # sessions of one user are correlated.
    rate = rng.beta(np.array([0.5, 0.55])[:, None], np.array([4.5, 4.45])[:, None], (runs, 2, n))
    clicks = rng.binomial(sessions.astype(int), rate).astype(float)
    sums = [clicks.sum(-1), (clicks**2).sum(-1), sessions.sum(-1), (sessions**2).sum(-1), (clicks * sessions).sum(-1)]
    m = ratio_moments(float(n), *sums)
    z = stats.norm.ppf(0.975)
    half = z * np.sqrt(m.var_of_mean)
    covered = np.abs(m.mean[:, 0] - 0.1) < half[:, 0]
    # Delta method: 95% ± 4 SE. A binomial interval on sessions ignores the clustering and covers ~86%.
    assert rate_within(float(covered.mean()), 0.95, runs)
    naive = z * np.sqrt(m.mean[:, 0] * (1 - m.mean[:, 0]) / sums[2][:, 0])
    assert float(np.mean(np.abs(m.mean[:, 0] - 0.1) < naive)) < 0.9
    # The relative lift between arms (true +10%) is covered too.
    c = contrast(
        Moments(m.n, m.mean[:, 0], m.var[:, 0]), Moments(m.n, m.mean[:, 1], m.var[:, 1]), Method.Z, ALPHA, 1.0, 1.0
    )
    lower, upper = c.interval
    assert rate_within(float(np.mean((lower < 0.1) & (upper > 0.1))), 0.95, runs)


def test_relative_lift_interval_of_a_mean_covers_the_true_lift() -> None:
    rng = np.random.default_rng(8)
    runs, n = 4_000, 500
    sx, sxx = normal_sums(rng, n, 10.0, 5.0, (runs,))
    tx, txx = normal_sums(rng, n, 10.5, 5.0, (runs,))
    test = fixed_test(mean_moments(n, sx, sxx), mean_moments(n, tx, txx), ALPHA, Method.WELCH)
    lower, upper = test.lift_interval()
    # Delta method with both arms' variances: 95% ± 4 SE; leaving out control's variance covers ~83%.
    assert rate_within(float(np.mean((lower < 0.05) & (upper > 0.05))), 0.95, runs)
