"""Judging one rollout step against the baseline serving at the same time, every decision kept as data.

Failing needs evidence, passing needs enough samples and a measured value within its threshold, and
anything else is INCONCLUSIVE: too little data never fails a version and never passes it.

The evidence for "worse than allowed" is an always-valid sequential test, because a step is analysed
again and again while it runs and a fixed-sample test peeked at every interval fails good versions far
more often than its level. For a count x of n trials whose probability should be at most p0, the
evidence is the likelihood ratio of a uniform mixture of alternatives (the odds of p0 times 1.25 … 10)
against p0. It is a nonnegative supermartingale for every p ≤ p0, so by Ville's inequality the chance
that it ever reaches 1/alpha, however often it is looked at, is at most alpha. The same test serves:
- the error rate (server errors of the requests judged) against an absolute limit;
- the error ratio against the baseline, conditioned on the errors both versions made: under "the
  candidate's rate is at most ratio × the baseline's", each error is the candidate's with odds at most
  ratio × n_candidate / n_baseline, whatever the traffic's error rate does over time (exact while the
  split holds still, as it does within a step);
- p99 latency: p99 ≤ T exactly when at most 1% of requests are slower than T, so the requests certainly
  slower than T (the buckets wholly above it) are tested against 1%;
- the shadow disagreement rate against its limit.
Score drift is the PSI of the served scores against the training histogram's bins; it fails only above
the limit plus the noise a sample of that size shows (see `psi_critical`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from statistics import NormalDist
from typing import Any

from model_manager.analysis_drift import feature_psi
from model_manager.drift_monitor import VersionBasis
from model_manager.windows import Histogram, VersionMetrics

# Odds multipliers of the alternatives mixed by the sequential test: it is quickest to detect effects of this size.
ALTERNATIVE_ODDS_RATIOS: tuple[float, ...] = (1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
# Smallest bin proportion used in PSI, so an empty bin gives a large but finite term.
PSI_EPSILON = 1e-4
# A p99 needs at least this many latencies to be more than the maximum.
P99_MIN_SAMPLES = 100


class Verdict(enum.Enum):
    """The outcome of one check or of a whole analysis."""

    PASSED = "PASSED"
    FAILED = "FAILED"
    INCONCLUSIVE = "INCONCLUSIVE"
    ERROR = "ERROR"


class Check(enum.Enum):
    """What a decision measured."""

    SAMPLES = "samples"
    ERROR_RATE = "error_rate"
    ERROR_RATIO = "error_ratio"
    LATENCY_P99 = "latency_p99_ms"
    LATENCY_P99_RATIO = "latency_p99_ratio"
    SCORE_PSI = "score_psi"
    SHADOW_DISAGREEMENT = "shadow_disagreement"
    SHADOW_MEAN_ABS_DIFF = "shadow_mean_abs_score_diff"
    FEATURE_DRIFT = "feature_drift"


@dataclass(frozen=True)
class AnalysisSpec:
    """Limits a step is judged by; an unset limit is not checked, the sample guard always is."""

    min_samples: int = 100
    alpha: float = 0.05
    max_error_rate: float | None = None
    max_error_ratio: float | None = None
    max_latency_p99_ms: float | None = None
    max_latency_p99_ratio: float | None = None
    max_score_psi: float | None = None
    score_output: str = ""
    max_shadow_disagreement: float | None = None
    max_mean_abs_score_diff: float | None = None
    max_feature_psi: float | None = None

    def __post_init__(self) -> None:
        if self.min_samples < 1:
            raise ValueError("min_samples: expected at least 1")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError("alpha: expected a level in (0, 1)")
        for name in ("max_error_rate", "max_shadow_disagreement"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}: expected a fraction in [0, 1]")
        for name in ("max_error_ratio", "max_latency_p99_ratio"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 1.0):
                raise ValueError(f"{name}: expected a finite ratio of at least 1")
        for name in ("max_latency_p99_ms", "max_score_psi", "max_feature_psi"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0.0):
                raise ValueError(f"{name}: expected a finite positive number")
        v = self.max_mean_abs_score_diff
        if v is not None and not (math.isfinite(v) and v >= 0.0):
            raise ValueError("max_mean_abs_score_diff: expected a finite number of at least 0")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AnalysisSpec:
        """The inverse of `to_dict`; unknown keys are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"analysis: unknown field {unknown[0]!r}")
        return cls(**d)


@dataclass(frozen=True)
class Decision:
    """One check's outcome with its reason as data: metric, measured value, threshold, samples and window."""

    check: Check
    verdict: Verdict
    measured: float | None
    threshold: float | None
    samples: int
    min_samples: int
    window_start: float | None
    window_end: float | None
    baseline: float | None = None
    baseline_samples: int | None = None
    evidence: float | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (an infinite evidence is written as the string "inf")."""
        d = asdict(self)
        d["check"] = self.check.value
        d["verdict"] = self.verdict.value
        if self.evidence is not None and math.isinf(self.evidence):
            d["evidence"] = "inf"
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Decision:
        """The inverse of `to_dict`."""
        args = dict(d)
        args["check"] = Check(d["check"])
        args["verdict"] = Verdict(d["verdict"])
        if d.get("evidence") == "inf":
            args["evidence"] = math.inf
        return cls(**args)


@dataclass(frozen=True)
class Analysis:
    """The verdict of one analysis round and the decisions it rests on."""

    verdict: Verdict
    decisions: tuple[Decision, ...]
    evaluated_at: float

    @property
    def reason(self) -> str:
        """One line naming the decisions that set the verdict."""
        deciding = [d for d in self.decisions if d.verdict == self.verdict] or list(self.decisions)
        return f"{self.verdict.value}: " + "; ".join(d.detail for d in deciding)

    def decision(self, check: Check) -> Decision | None:
        """The decision of one check, if it ran."""
        return next((d for d in self.decisions if d.check == check), None)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "verdict": self.verdict.value,
            "decisions": [d.to_dict() for d in self.decisions],
            "evaluated_at": self.evaluated_at,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Analysis:
        """The inverse of `to_dict`."""
        return cls(
            Verdict(d["verdict"]),
            tuple(Decision.from_dict(x) for x in d["decisions"]),
            float(d["evaluated_at"]),
        )


def log_evidence(x: int, n: int, p0: float) -> float:
    """Log of the mixture likelihood ratio for "x of n trials, each with probability > p0" against p ≤ p0."""
    if not 0 <= x <= n:
        raise ValueError("x: expected a count between 0 and n")
    if p0 >= 1.0:
        return -math.inf
    if p0 <= 0.0:
        return math.inf if x > 0 else 0.0
    odds0 = p0 / (1.0 - p0)
    terms = []
    for r in ALTERNATIVE_ODDS_RATIOS:
        p1 = odds0 * r / (1.0 + odds0 * r)
        terms.append(x * math.log(p1 / p0) + (n - x) * math.log((1.0 - p1) / (1.0 - p0)))
    top = max(terms)
    return top + math.log(sum(math.exp(t - top) for t in terms) / len(terms))


def psi(observed: Histogram, expected: Histogram) -> float:
    """Population stability index of `observed` against `expected` over the same bins."""
    if observed.bounds != expected.bounds:
        raise ValueError("bucket_bounds: PSI needs the same bins on both sides")
    n_obs, n_exp = observed.total, expected.total
    if n_obs == 0 or n_exp == 0:
        raise ValueError("bucket_counts: PSI needs observations on both sides")
    total = 0.0
    for o, e in zip(observed.counts, expected.counts, strict=True):
        a = max(o / n_obs, PSI_EPSILON)
        b = max(e / n_exp, PSI_EPSILON)
        total += (a - b) * math.log(a / b)
    return total


def psi_critical(limit: float, n: int, buckets: int, alpha: float) -> float:
    """The PSI above which a sample of n shows drift beyond `limit` at level alpha.

    n·PSI behaves like a chi-square with buckets-1 degrees of freedom, noncentral by n·limit when the
    true PSI is the limit; the bar is that distribution's mean plus z(1-alpha) standard deviations.
    Without it a small sample of an undrifted version would often show a PSI above 0.1 by noise alone.
    """
    k, lam = buckets - 1, n * limit
    z = NormalDist().inv_cdf(1.0 - alpha)
    return (k + lam + z * math.sqrt(2.0 * (k + 2.0 * lam))) / n


class _Judge:
    """Builds the decisions of one analysis round."""

    def __init__(
        self,
        cand: VersionMetrics,
        base: VersionMetrics | None,
        spec: AnalysisSpec,
        reference: Histogram | None,
        drift_basis: VersionBasis | None = None,
    ) -> None:
        self.cand, self.base, self.spec, self.reference = cand, base, spec, reference
        self.drift_basis = drift_basis
        self.log_bar = math.log(1.0 / spec.alpha)

    def decide(self, check: Check, verdict: Verdict, samples: int, detail: str, **kw: Any) -> Decision:
        return Decision(
            check=check,
            verdict=verdict,
            samples=samples,
            min_samples=kw.pop("min_samples", self.spec.min_samples),
            window_start=self.cand.start,
            window_end=self.cand.end,
            detail=detail,
            measured=kw.pop("measured", None),
            threshold=kw.pop("threshold", None),
            **kw,
        )

    def evidence(self, x: int, n: int, p0: float) -> tuple[float, bool]:
        le = log_evidence(x, n, p0)
        return (math.exp(min(le, 700.0)) if le < math.inf else math.inf), le >= self.log_bar

    def samples(self) -> Decision:
        n, need = self.cand.judged, self.spec.min_samples
        ok = n >= need
        return self.decide(
            Check.SAMPLES,
            Verdict.PASSED if ok else Verdict.INCONCLUSIVE,
            n,
            f"{n}/{need} samples",
            measured=float(n),
            threshold=float(need),
        )

    def error_rate(self, limit: float) -> Decision:
        n, x = self.cand.judged, self.cand.server_errors
        if n < self.spec.min_samples:
            return self.decide(
                Check.ERROR_RATE,
                Verdict.INCONCLUSIVE,
                n,
                f"error rate: {n}/{self.spec.min_samples} samples",
                threshold=limit,
            )
        rate = x / n
        ev, significant = self.evidence(x, n, limit)
        verdict = Verdict.FAILED if significant else Verdict.PASSED if rate <= limit else Verdict.INCONCLUSIVE
        return self.decide(
            Check.ERROR_RATE,
            verdict,
            n,
            f"error rate {rate:.4f} ({x}/{n}) vs limit {limit:.4f}{_why(verdict)}",
            measured=rate,
            threshold=limit,
            evidence=ev,
        )

    def error_ratio(self, ratio: float) -> Decision | None:
        if self.base is None:
            return None
        n_c, x_c, n_b, x_b = self.cand.judged, self.cand.server_errors, self.base.judged, self.base.server_errors
        need = self.spec.min_samples
        if n_c < need or n_b < need:
            return self.decide(
                Check.ERROR_RATIO,
                Verdict.INCONCLUSIVE,
                n_c,
                f"error ratio: {n_c}/{need} samples, baseline {n_b}/{need}",
                measured=x_c / n_c if n_c else None,
                baseline=x_b / n_b if n_b else None,
                baseline_samples=n_b,
            )
        rate_c, rate_b = x_c / n_c, x_b / n_b
        limit = ratio * rate_b
        common = {"measured": rate_c, "threshold": limit, "baseline": rate_b, "baseline_samples": n_b}
        # Conditioned on the errors both made, an error is the candidate's with odds ≤ ratio × n_c / n_b.
        odds0 = ratio * n_c / n_b
        ev, significant = self.evidence(x_c, x_c + x_b, odds0 / (1.0 + odds0))
        # One request's worth of slack: a single error against a clean baseline is not yet "worse".
        within = rate_c <= limit + 1.0 / n_c
        verdict = Verdict.FAILED if significant else Verdict.PASSED if within else Verdict.INCONCLUSIVE
        return self.decide(
            Check.ERROR_RATIO,
            verdict,
            n_c,
            f"error rate {rate_c:.4f} ({x_c}/{n_c}) vs {ratio:g}× baseline {rate_b:.4f} ({x_b}/{n_b}){_why(verdict)}",
            evidence=ev,
            **common,
        )

    def p99(self, check: Check, limit: float, what: str, **extra: Any) -> Decision:
        lat = self.cand.latency_ms
        n, need = lat.total, max(self.spec.min_samples, P99_MIN_SAMPLES)
        if n < need:
            return self.decide(
                check, Verdict.INCONCLUSIVE, n, f"p99: {n}/{need} samples", threshold=limit, min_samples=need, **extra
            )
        p99 = lat.quantile(0.99)
        overflow = math.isinf(p99)
        measured = lat.bounds[-1] if overflow else p99
        ev, significant = self.evidence(lat.count_above(limit), n, 0.01)
        within = not overflow and p99 <= limit
        verdict = Verdict.FAILED if significant else Verdict.PASSED if within else Verdict.INCONCLUSIVE
        shown = f"> {measured:g}" if overflow else f"{measured:.1f}"
        return self.decide(
            check,
            verdict,
            n,
            f"p99 {shown} ms vs {what} {limit:.1f} ms (n={n}){_why(verdict)}",
            measured=measured,
            threshold=limit,
            evidence=ev,
            min_samples=need,
            **extra,
        )

    def p99_ratio(self, ratio: float) -> Decision | None:
        if self.base is None:
            return None
        lat_b = self.base.latency_ms
        need = max(self.spec.min_samples, P99_MIN_SAMPLES)
        base_p99 = lat_b.quantile(0.99) if lat_b.total else math.nan
        if lat_b.total < need or not math.isfinite(base_p99):
            n = self.cand.latency_ms.total
            why = (
                f"baseline {lat_b.total}/{need} samples" if lat_b.total < need else "baseline p99 above the last bucket"
            )
            return self.decide(
                Check.LATENCY_P99_RATIO,
                Verdict.INCONCLUSIVE,
                n,
                f"p99 vs baseline: {why}",
                min_samples=need,
                baseline_samples=lat_b.total,
            )
        return self.p99(
            Check.LATENCY_P99_RATIO,
            ratio * base_p99,
            f"{ratio:g}× baseline",
            baseline=base_p99,
            baseline_samples=lat_b.total,
        )

    def score_psi(self, limit: float) -> Decision:
        name = self.spec.score_output or (min(self.cand.scores) if self.cand.scores else "")
        hist = self.cand.scores.get(name)
        n = hist.total if hist is not None else 0
        label = f"score psi[{name or '?'}]"
        if self.reference is None or self.reference.total == 0:
            return self.decide(
                Check.SCORE_PSI, Verdict.ERROR, n, f"{label}: no training histogram to compare with", threshold=limit
            )
        if hist is None or n < self.spec.min_samples:
            return self.decide(
                Check.SCORE_PSI,
                Verdict.INCONCLUSIVE,
                n,
                f"{label}: {n}/{self.spec.min_samples} samples",
                threshold=limit,
            )
        if hist.bounds != self.reference.bounds:
            return self.decide(
                Check.SCORE_PSI,
                Verdict.ERROR,
                n,
                f"{label}: score bins differ from the training histogram's",
                threshold=limit,
            )
        value = psi(hist, self.reference)
        base_hist = self.base.scores.get(name) if self.base is not None else None
        base_value = psi(base_hist, self.reference) if base_hist is not None and base_hist.total else None
        bar = psi_critical(limit, n, len(hist.counts), self.spec.alpha)
        verdict = Verdict.FAILED if value > bar else Verdict.PASSED if value <= limit else Verdict.INCONCLUSIVE
        shown_base = "" if base_value is None else f" (baseline {base_value:.3f})"
        return self.decide(
            Check.SCORE_PSI,
            verdict,
            n,
            f"{label} {value:.3f} vs limit {limit:g}{shown_base} (n={n}, fails above {bar:.3f})",
            measured=value,
            threshold=limit,
            baseline=base_value,
            baseline_samples=None if base_hist is None else base_hist.total,
        )

    def shadow(self, limit: float) -> Decision:
        s = self.cand.shadow
        n, x = s.compared, s.disagreed
        if n < self.spec.min_samples:
            return self.decide(
                Check.SHADOW_DISAGREEMENT,
                Verdict.INCONCLUSIVE,
                n,
                f"shadow: {n}/{self.spec.min_samples} compared",
                threshold=limit,
            )
        rate = x / n
        ev, significant = self.evidence(x, n, limit)
        verdict = Verdict.FAILED if significant else Verdict.PASSED if rate <= limit else Verdict.INCONCLUSIVE
        return self.decide(
            Check.SHADOW_DISAGREEMENT,
            verdict,
            n,
            f"shadow disagreement {rate:.4f} ({x}/{n}, mean |diff| {s.abs_diff_sum / n:.4g}) vs limit {limit:.4f}"
            f"{_why(verdict)}",
            measured=rate,
            threshold=limit,
            evidence=ev,
        )

    def shadow_mean_abs_diff(self, limit: float) -> Decision:
        """The mean per-request |mirrored - served| score, judged once enough requests were compared.

        A mean of bounded differences settles quickly, so it is judged on the sample guard alone: above the limit
        on at least min_samples comparisons fails, at or below passes.
        """
        s = self.cand.shadow
        n = s.compared
        if n < self.spec.min_samples:
            return self.decide(
                Check.SHADOW_MEAN_ABS_DIFF,
                Verdict.INCONCLUSIVE,
                n,
                f"shadow: {n}/{self.spec.min_samples} compared",
                threshold=limit,
            )
        mean = s.abs_diff_sum / n
        verdict = Verdict.PASSED if mean <= limit else Verdict.FAILED
        return self.decide(
            Check.SHADOW_MEAN_ABS_DIFF,
            verdict,
            n,
            f"shadow mean |score diff| {mean:.4g} over {n} compared vs limit {limit:.4g}"
            + ("" if verdict is Verdict.PASSED else ", above"),
            measured=mean,
            threshold=limit,
        )

    def feature_drift(self, limit: float) -> Decision:
        """The largest PSI of the candidate's inputs and scores in the step, of those with enough values."""
        found = feature_psi(self.cand.sketches, self.drift_basis)
        check = Check.FEATURE_DRIFT
        if found.missing:
            return self.decide(check, Verdict.ERROR, 0, f"feature psi: {found.missing}", threshold=limit)
        need = found.min_rows
        if not found.judged:
            detail = f"feature psi: {found.most_values}/{need} values"
            return self.decide(
                check, Verdict.INCONCLUSIVE, found.most_values, detail, threshold=limit, min_samples=need
            )
        worst, name, n = found.judged[0]
        over = [f"{what} {psi:.3f}" for psi, what, _ in found.judged if psi > limit]
        if over:
            detail = f"feature psi over the limit {limit:g}: {', '.join(over)}"
        else:
            detail = f"feature psi {worst:.3f} ({name}, n={n}) vs limit {limit:g} over {len(found.judged)} names"
        verdict = Verdict.FAILED if over else Verdict.PASSED
        return self.decide(check, verdict, n, detail, measured=worst, threshold=limit, min_samples=need)


def _why(verdict: Verdict) -> str:
    if verdict is Verdict.FAILED:
        return ", significantly above"
    if verdict is Verdict.INCONCLUSIVE:
        return ", above but not yet significant"
    return ""


def analyse(
    candidate: VersionMetrics,
    baseline: VersionMetrics | None,
    spec: AnalysisSpec,
    *,
    now: float,
    reference: Histogram | None = None,
    drift_basis: VersionBasis | None = None,
) -> Analysis:
    """Judges `candidate` against `baseline` (None when no baseline serves alongside, e.g. after a blue-green flip).

    `reference` is the training histogram of the score output for the PSI check; `drift_basis` the candidate's
    training statistics and drift policy for the feature drift check (its sketches merged in `candidate`).
    """
    judge = _Judge(candidate, baseline, spec, reference, drift_basis)
    decisions: list[Decision | None] = [judge.samples()]
    if spec.max_error_rate is not None:
        decisions.append(judge.error_rate(spec.max_error_rate))
    if spec.max_error_ratio is not None:
        decisions.append(judge.error_ratio(spec.max_error_ratio))
    if spec.max_latency_p99_ms is not None:
        decisions.append(judge.p99(Check.LATENCY_P99, spec.max_latency_p99_ms, "limit"))
    if spec.max_latency_p99_ratio is not None:
        decisions.append(judge.p99_ratio(spec.max_latency_p99_ratio))
    if spec.max_score_psi is not None:
        decisions.append(judge.score_psi(spec.max_score_psi))
    if spec.max_shadow_disagreement is not None:
        decisions.append(judge.shadow(spec.max_shadow_disagreement))
    if spec.max_mean_abs_score_diff is not None:
        decisions.append(judge.shadow_mean_abs_diff(spec.max_mean_abs_score_diff))
    if spec.max_feature_psi is not None:
        decisions.append(judge.feature_drift(spec.max_feature_psi))
    kept = tuple(d for d in decisions if d is not None)
    verdict = combine(d.verdict for d in kept)
    if verdict is Verdict.FAILED and kept[0].verdict is not Verdict.PASSED:
        # Never fail a version on too little live traffic, even when a check with its own count (scores per
        # row, mirrored comparisons) looks bad: the failing decision stays visible, the step holds.
        verdict = Verdict.INCONCLUSIVE
    return Analysis(verdict, kept, now)


def combine(verdicts: Iterable[Verdict]) -> Verdict:
    """FAILED wins, then ERROR, then INCONCLUSIVE; PASSED only when every check passed."""
    seen = set(verdicts)
    for v in (Verdict.FAILED, Verdict.ERROR, Verdict.INCONCLUSIVE):
        if v in seen:
            return v
    return Verdict.PASSED
