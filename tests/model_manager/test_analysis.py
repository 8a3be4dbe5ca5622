"""Step analysis: the sequential test, p99, PSI, shadow disagreement, verdicts and the sample guard."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats  # type: ignore[import-untyped]

from model_manager.analysis import (
    Analysis,
    AnalysisSpec,
    Check,
    Verdict,
    analyse,
    combine,
    log_evidence,
    psi,
    psi_critical,
)
from model_manager.windows import LATENCY_BOUNDS_MS, Histogram, ShadowComparison, VersionMetrics

ALPHA = 0.05
BAR = math.log(1 / ALPHA)


def metrics(
    version: int = 2,
    *,
    ok: int = 0,
    errors: int = 0,
    client_errors: int = 0,
    latency_ms: float | list[float] = 5.0,
    scores: dict[str, Histogram] | None = None,
    shadow: ShadowComparison | None = None,
) -> VersionMetrics:
    status = {"OK": ok, "INTERNAL": errors, "INVALID_ARGUMENT": client_errors}
    lat = latency_ms if isinstance(latency_ms, list) else [latency_ms] * (ok + errors)
    return VersionMetrics(
        model="churn",
        version=version,
        status_counts=status,
        latency_ms=Histogram.of(LATENCY_BOUNDS_MS, lat),
        scores=scores or {},
        shadow=shadow or ShadowComparison(),
        windows=3,
        start=1000.0,
        end=1030.0,
    )


# -- the sequential test --------------------------------------------------------------------------------------------


@settings(deadline=None)
@given(st.integers(1, 3000), st.floats(0.001, 0.5), st.data())
def test_a_rejection_is_never_less_significant_than_the_fixed_sample_binomial_test(n, p0, data):
    # Every alternative has p > p0, so the evidence grows with x and rejects a tail {x >= x*}; Markov's inequality
    # bounds that tail's probability by alpha, so scipy's exact binomial tail at the observed x is at most alpha too.
    x = data.draw(st.integers(0, n))
    if log_evidence(x, n, p0) >= BAR:
        assert stats.binom.sf(x - 1, n, p0) <= ALPHA


def test_evidence_grows_with_the_count_and_edge_limits_are_exact():
    values = [log_evidence(x, 1000, 0.01) for x in range(0, 60)]
    assert values == sorted(values)
    assert log_evidence(0, 1000, 0.0) == 0.0
    assert log_evidence(1, 1000, 0.0) == math.inf  # a limit of zero errors: one error is proof
    assert log_evidence(1000, 1000, 1.0) == -math.inf
    with pytest.raises(ValueError, match="x"):
        log_evidence(5, 4, 0.1)


def test_peeking_after_every_window_keeps_false_failures_below_alpha_unlike_a_fixed_z_test():
    # 400 good versions erroring exactly at the limit, analysed after each of 60 windows of 200 requests.
    rng = np.random.default_rng(20261202)
    p0, runs, looks, per_look = 0.01, 400, 60, 200
    errors = np.cumsum(rng.binomial(per_look, p0, size=(runs, looks)), axis=1)
    n = per_look * np.arange(1, looks + 1)
    ours = sum(any(log_evidence(int(x), int(m), p0) >= BAR for x, m in zip(row, n, strict=True)) for row in errors)
    z = (errors / n - p0) / np.sqrt(p0 * (1 - p0) / n)
    naive = int(np.sum(np.any(stats.norm.sf(z) <= ALPHA, axis=1)))
    assert ours / runs <= ALPHA
    assert naive / runs > 2 * ALPHA  # why a fixed-sample test is not used: peeking inflates its error


def test_the_sequential_test_detects_a_doubled_error_rate():
    rng = np.random.default_rng(7)
    errors = rng.binomial(5000, 0.02)
    assert log_evidence(int(errors), 5000, 0.01) >= BAR


# -- error rate ----------------------------------------------------------------------------------------------------


def test_an_erroring_canary_fails_with_its_reason_as_data():
    spec = AnalysisSpec(min_samples=200, max_error_rate=0.01)
    a = analyse(metrics(ok=900, errors=100), metrics(1, ok=9000, errors=10), spec, now=1030.0)
    assert a.verdict is Verdict.FAILED
    d = a.decision(Check.ERROR_RATE)
    assert d is not None
    assert (d.verdict, d.measured, d.threshold, d.samples, d.min_samples) == (Verdict.FAILED, 0.1, 0.01, 1000, 200)
    assert (d.window_start, d.window_end) == (1000.0, 1030.0)
    assert d.evidence is not None
    assert d.evidence >= 1 / ALPHA
    assert "0.1000 (100/1000)" in d.detail
    assert "error rate 0.1000" in a.reason


def test_client_errors_never_count_against_a_version():
    spec = AnalysisSpec(min_samples=100, max_error_rate=0.01, max_error_ratio=1.5)
    a = analyse(metrics(ok=500, client_errors=5000), metrics(1, ok=5000, client_errors=10), spec, now=1.0)
    assert a.verdict is Verdict.PASSED
    d = a.decision(Check.ERROR_RATE)
    assert d is not None
    assert (d.measured, d.samples) == (0.0, 500)


@settings(deadline=None)
@given(st.integers(0, 99), st.integers(0, 99), st.booleans())
def test_too_few_samples_is_inconclusive_never_failed_or_passed(ok, errors, with_baseline):
    if ok + errors >= 100:
        return
    spec = AnalysisSpec(
        min_samples=100, max_error_rate=0.01, max_error_ratio=1.0, max_latency_p99_ms=1.0, max_shadow_disagreement=0.0
    )
    base = metrics(1, ok=10_000, errors=1) if with_baseline else None
    a = analyse(metrics(ok=ok, errors=errors, latency_ms=4000.0), base, spec, now=1.0)
    assert a.verdict is Verdict.INCONCLUSIVE
    assert all(d.verdict is Verdict.INCONCLUSIVE for d in a.decisions)
    guard = a.decision(Check.SAMPLES)
    assert guard is not None
    assert guard.detail == f"{ok + errors}/100 samples"


@settings(deadline=None, max_examples=300)
@given(
    st.integers(0, 300),
    st.integers(0, 300),
    st.integers(0, 600),
    st.integers(0, 600),
    st.lists(st.integers(0, 400), min_size=4, max_size=4),
)
def test_a_failed_verdict_always_rests_on_enough_live_samples(ok, errors, compared, disagreed, score_counts):
    bins = (0.25, 0.5, 0.75)
    spec = AnalysisSpec(
        min_samples=200, max_error_rate=0.01, max_latency_p99_ms=3.0, max_score_psi=0.1,
        max_shadow_disagreement=0.01, score_output="p",
    )  # fmt: skip
    cand = metrics(
        ok=ok, errors=errors, latency_ms=40.0, scores={"p": Histogram(bins, tuple(score_counts))},
        shadow=ShadowComparison(compared, min(disagreed, compared)),
    )  # fmt: skip
    a = analyse(cand, None, spec, now=1.0, reference=Histogram(bins, (100, 100, 100, 100)))
    guard = a.decision(Check.SAMPLES)
    assert guard is not None
    if a.verdict is Verdict.FAILED:
        assert guard.verdict is Verdict.PASSED
    if ok + errors < 200:
        assert a.verdict in (Verdict.INCONCLUSIVE, Verdict.ERROR)


def test_a_bad_shadow_on_thin_live_traffic_holds_and_shows_the_failing_decision():
    spec = AnalysisSpec(min_samples=100, max_shadow_disagreement=0.01)
    a = analyse(metrics(ok=10, shadow=ShadowComparison(1000, 500)), None, spec, now=1.0)
    assert a.verdict is Verdict.INCONCLUSIVE
    d = a.decision(Check.SHADOW_DISAGREEMENT)
    assert d is not None
    assert d.verdict is Verdict.FAILED
    assert a.reason == "INCONCLUSIVE: 10/100 samples"


def test_no_data_at_all_is_inconclusive():
    spec = AnalysisSpec(min_samples=500, max_error_rate=0.01, max_latency_p99_ms=100.0)
    a = analyse(metrics(), metrics(1), spec, now=1.0)
    assert a.verdict is Verdict.INCONCLUSIVE
    assert a.reason.startswith("INCONCLUSIVE: 0/500 samples")


def test_a_rate_above_the_limit_but_not_yet_significant_is_inconclusive():
    a = analyse(metrics(ok=196, errors=4), None, AnalysisSpec(min_samples=100, max_error_rate=0.01), now=1.0)
    d = a.decision(Check.ERROR_RATE)
    assert d is not None
    assert d.verdict is Verdict.INCONCLUSIVE
    assert "not yet significant" in d.detail


def test_error_ratio_against_the_baseline_at_the_same_time():
    spec = AnalysisSpec(min_samples=100, max_error_ratio=2.0)
    worse = analyse(metrics(ok=950, errors=50), metrics(1, ok=9900, errors=100), spec, now=1.0)
    d = worse.decision(Check.ERROR_RATIO)
    assert d is not None
    assert d.verdict is Verdict.FAILED
    assert (d.measured, d.baseline, d.threshold, d.baseline_samples) == (0.05, 0.01, 0.02, 10_000)
    same = analyse(metrics(ok=990, errors=10), metrics(1, ok=9900, errors=100), spec, now=1.0)
    assert same.verdict is Verdict.PASSED
    # One error against a clean baseline is within one request's worth of slack.
    lone = analyse(metrics(ok=999, errors=1), metrics(1, ok=9000), spec, now=1.0)
    assert lone.verdict is Verdict.PASSED


def test_error_ratio_is_skipped_without_a_baseline_and_waits_for_baseline_samples():
    spec = AnalysisSpec(min_samples=100, max_error_ratio=1.0)
    assert analyse(metrics(ok=500), None, spec, now=1.0).decision(Check.ERROR_RATIO) is None
    thin = analyse(metrics(ok=500), metrics(1, ok=20), spec, now=1.0).decision(Check.ERROR_RATIO)
    assert thin is not None
    assert thin.verdict is Verdict.INCONCLUSIVE
    assert "baseline 20/100" in thin.detail


@settings(deadline=None)
@given(st.integers(0, 40), st.integers(100, 2000), st.integers(0, 40), st.integers(100, 20000))
def test_error_ratio_rejection_agrees_with_scipys_conditional_binomial_tail(x_c, n_c, x_b, n_b):
    spec = AnalysisSpec(min_samples=100, max_error_ratio=1.0)
    a = analyse(metrics(ok=n_c, errors=x_c), metrics(1, ok=n_b, errors=x_b), spec, now=1.0)
    d = a.decision(Check.ERROR_RATIO)
    assert d is not None
    if d.verdict is Verdict.FAILED:
        share = (n_c + x_c) / (n_c + x_c + n_b + x_b)
        assert stats.binom.sf(x_c - 1, x_c + x_b, share) <= ALPHA


# -- latency -------------------------------------------------------------------------------------------------------


def test_p99_from_the_merged_histogram_against_an_absolute_limit():
    fast = [4.0] * 990 + [40.0] * 10
    spec = AnalysisSpec(min_samples=100, max_latency_p99_ms=50.0)
    a = analyse(metrics(ok=1000, latency_ms=fast), None, spec, now=1.0)
    d = a.decision(Check.LATENCY_P99)
    assert d is not None
    assert d.verdict is Verdict.PASSED
    assert d.measured is not None
    assert 5.0 <= d.measured <= 50.0
    slow = [4.0] * 900 + [400.0] * 100
    d = analyse(metrics(ok=1000, latency_ms=slow), None, spec, now=1.0).decision(Check.LATENCY_P99)
    assert d is not None
    assert d.verdict is Verdict.FAILED
    assert (d.threshold, d.samples) == (50.0, 1000)


def test_p99_needs_a_hundred_latencies_even_with_a_lower_minimum():
    spec = AnalysisSpec(min_samples=10, max_latency_p99_ms=50.0)
    d = analyse(metrics(ok=50, latency_ms=4000.0), None, spec, now=1.0).decision(Check.LATENCY_P99)
    assert d is not None
    assert (d.verdict, d.min_samples) == (Verdict.INCONCLUSIVE, 100)


def test_p99_above_the_last_bucket_reports_the_last_bound():
    spec = AnalysisSpec(min_samples=100, max_latency_p99_ms=100.0)
    d = analyse(metrics(ok=200, latency_ms=9000.0), None, spec, now=1.0).decision(Check.LATENCY_P99)
    assert d is not None
    assert (d.verdict, d.measured) == (Verdict.FAILED, 5000.0)
    assert "> 5000" in d.detail


def test_p99_relative_to_the_baseline():
    spec = AnalysisSpec(min_samples=100, max_latency_p99_ratio=1.5)
    base = metrics(1, ok=2000, latency_ms=[8.0] * 2000)
    ok = analyse(metrics(ok=500, latency_ms=[9.0] * 500), base, spec, now=1.0)
    d = ok.decision(Check.LATENCY_P99_RATIO)
    assert d is not None
    assert d.verdict is Verdict.PASSED
    assert d.baseline is not None
    assert d.threshold == pytest.approx(1.5 * d.baseline)
    slow = analyse(metrics(ok=500, latency_ms=[60.0] * 500), base, spec, now=1.0)
    assert slow.verdict is Verdict.FAILED


# -- score drift ---------------------------------------------------------------------------------------------------


def test_psi_matches_scipys_symmetric_relative_entropy():
    bins = (0.2, 0.4, 0.6, 0.8)
    obs = Histogram(bins, (10, 20, 30, 25, 15))
    exp = Histogram(bins, (20, 20, 20, 20, 20))
    a = np.array(obs.counts) / obs.total
    e = np.array(exp.counts) / exp.total
    assert psi(obs, exp) == pytest.approx(float(np.sum(special.rel_entr(a, e) + special.rel_entr(e, a))))
    assert psi(exp, exp) == 0.0


def test_psi_of_an_empty_bin_is_large_but_finite():
    bins = (0.5,)
    value = psi(Histogram(bins, (100, 0)), Histogram(bins, (50, 50)))
    assert math.isfinite(value)
    assert value > 1.0


def test_psi_noise_without_drift_is_about_bins_minus_one_over_n():
    # A sample of the training distribution itself: n·PSI behaves like a chi-square with B-1 degrees of freedom.
    rng = np.random.default_rng(11)
    bins = tuple(np.linspace(0.1, 0.9, 9))
    train = Histogram.of(bins, rng.beta(2, 5, 200_000))
    n = 2000
    values = [n * psi(Histogram.of(bins, rng.beta(2, 5, n)), train) for _ in range(200)]
    assert float(np.mean(values)) == pytest.approx(len(bins), rel=0.25)


def test_psi_fails_an_undrifted_small_sample_rarely_where_a_bare_threshold_would_often():
    rng = np.random.default_rng(5)
    bins = tuple(np.linspace(0.1, 0.9, 9))
    train = Histogram.of(bins, rng.beta(2, 5, 200_000))
    n, limit = 100, 0.1
    values = [psi(Histogram.of(bins, rng.beta(2, 5, n)), train) for _ in range(400)]
    bar = psi_critical(limit, n, len(bins) + 1, ALPHA)
    assert sum(v > bar for v in values) / len(values) <= ALPHA
    assert sum(v > limit for v in values) / len(values) > 2 * ALPHA


def test_psi_bar_tends_to_the_limit_with_more_samples():
    bars = [psi_critical(0.1, n, 10, ALPHA) for n in (100, 1_000, 100_000)]
    assert bars == sorted(bars, reverse=True)
    assert 0.1 < bars[-1] < 0.105


def test_a_psi_just_above_the_limit_on_few_samples_is_inconclusive():
    bins = (0.25, 0.5, 0.75)
    train = Histogram(bins, (250, 250, 250, 250))
    spec = AnalysisSpec(min_samples=100, max_score_psi=0.1, score_output="p")
    cand = metrics(ok=100, scores={"p": Histogram(bins, (10, 25, 25, 40))})
    d = analyse(cand, None, spec, now=1.0, reference=train).decision(Check.SCORE_PSI)
    assert d is not None
    assert d.measured is not None
    assert 0.1 < d.measured < psi_critical(0.1, 100, 4, ALPHA)
    assert d.verdict is Verdict.INCONCLUSIVE


def test_score_psi_against_the_training_histogram():
    bins = (0.25, 0.5, 0.75)
    train = Histogram(bins, (250, 250, 250, 250))
    spec = AnalysisSpec(min_samples=100, max_score_psi=0.2, score_output="p")
    same = metrics(ok=400, scores={"p": Histogram(bins, (100, 100, 100, 100))})
    drift = metrics(ok=400, scores={"p": Histogram(bins, (10, 10, 80, 300))})
    assert analyse(same, None, spec, now=1.0, reference=train).verdict is Verdict.PASSED
    d = analyse(drift, same, spec, now=1.0, reference=train).decision(Check.SCORE_PSI)
    assert d is not None
    assert d.verdict is Verdict.FAILED
    assert d.measured is not None
    assert d.measured > 0.2
    assert d.baseline == 0.0


def test_score_psi_without_a_reference_or_with_other_bins_is_an_error():
    spec = AnalysisSpec(min_samples=10, max_score_psi=0.2)
    cand = metrics(ok=100, scores={"p": Histogram((0.5,), (50, 50))})
    assert analyse(cand, None, spec, now=1.0).verdict is Verdict.ERROR
    other = Histogram((0.4,), (50, 50))
    a = analyse(cand, None, spec, now=1.0, reference=other)
    assert a.verdict is Verdict.ERROR
    assert "bins differ" in a.reason


# -- shadow --------------------------------------------------------------------------------------------------------


def test_shadow_disagreement_rate():
    spec = AnalysisSpec(min_samples=100, max_shadow_disagreement=0.05)
    agree = metrics(ok=1000, shadow=ShadowComparison(1000, 20, 3.0))
    a = analyse(agree, None, spec, now=1.0)
    d = a.decision(Check.SHADOW_DISAGREEMENT)
    assert d is not None
    assert (d.verdict, d.measured, d.samples) == (Verdict.PASSED, 0.02, 1000)
    assert "mean |diff| 0.003" in d.detail
    disagree = metrics(ok=1000, shadow=ShadowComparison(1000, 200, 30.0))
    assert analyse(disagree, None, spec, now=1.0).verdict is Verdict.FAILED


def test_shadow_mean_abs_score_difference():
    spec = AnalysisSpec(min_samples=100, max_mean_abs_score_diff=0.01)
    close = analyse(metrics(ok=1000, shadow=ShadowComparison(500, 40, 2.5)), None, spec, now=1.0)
    d = close.decision(Check.SHADOW_MEAN_ABS_DIFF)
    assert d is not None
    assert (d.verdict, d.measured, d.threshold, d.samples) == (Verdict.PASSED, 0.005, 0.01, 500)
    far = analyse(metrics(ok=1000, shadow=ShadowComparison(500, 400, 25.0)), None, spec, now=1.0)
    d = far.decision(Check.SHADOW_MEAN_ABS_DIFF)
    assert d is not None
    assert (far.verdict, d.verdict, d.measured) == (Verdict.FAILED, Verdict.FAILED, 0.05)
    assert "0.05 over 500 compared vs limit 0.01, above" in d.detail
    # Too few comparisons is never a failure, however far apart they are.
    thin = analyse(metrics(ok=1000, shadow=ShadowComparison(50, 50, 40.0)), None, spec, now=1.0)
    d = thin.decision(Check.SHADOW_MEAN_ABS_DIFF)
    assert d is not None
    assert (thin.verdict, d.verdict, d.samples) == (Verdict.INCONCLUSIVE, Verdict.INCONCLUSIVE, 50)
    with pytest.raises(ValueError, match="max_mean_abs_score_diff"):
        AnalysisSpec(max_mean_abs_score_diff=-1.0)


# -- verdicts and data ---------------------------------------------------------------------------------------------


def test_verdicts_combine_failed_then_error_then_inconclusive():
    assert combine([Verdict.PASSED, Verdict.INCONCLUSIVE, Verdict.ERROR, Verdict.FAILED]) is Verdict.FAILED
    assert combine([Verdict.PASSED, Verdict.INCONCLUSIVE, Verdict.ERROR]) is Verdict.ERROR
    assert combine([Verdict.PASSED, Verdict.INCONCLUSIVE]) is Verdict.INCONCLUSIVE
    assert combine([Verdict.PASSED]) is Verdict.PASSED


def test_analysis_round_trips_through_json():
    spec = AnalysisSpec(min_samples=100, max_error_rate=0.0, max_latency_p99_ms=50.0)
    a = analyse(metrics(ok=900, errors=100), None, spec, now=1030.0)
    d = a.decision(Check.ERROR_RATE)
    assert d is not None
    assert d.evidence == math.inf
    assert Analysis.from_dict(json.loads(json.dumps(a.to_dict()))) == a


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"min_samples": 0}, "min_samples"),
        ({"alpha": 1.0}, "alpha"),
        ({"max_error_rate": 1.5}, "max_error_rate"),
        ({"max_error_ratio": 0.5}, "max_error_ratio"),
        ({"max_latency_p99_ms": -1.0}, "max_latency_p99_ms"),
        ({"max_score_psi": math.nan}, "max_score_psi"),
    ],
)
def test_analysis_spec_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AnalysisSpec(**kwargs)


def test_analysis_spec_refuses_unknown_fields():
    with pytest.raises(ValueError, match="unknown field 'max_errors'"):
        AnalysisSpec.from_dict({"max_errors": 1})
    spec = AnalysisSpec(max_error_rate=0.02)
    assert AnalysisSpec.from_dict(spec.to_dict()) == spec
