"""Fixed-horizon comparisons of two arms: Welch's t-test, the two-proportion z-test, the delta-method ratio
and relative lift. Every function works elementwise on numpy arrays, so a simulation tests thousands of runs at once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import stats

FloatArray = npt.NDArray[np.float64]


def as_array(value: npt.ArrayLike) -> FloatArray:
    """`value` as a float64 array (0-d for a scalar)."""
    return np.asarray(value, dtype=np.float64)


def ratio_or(numerator: npt.ArrayLike, denominator: npt.ArrayLike, default: float) -> FloatArray:
    """numerator / denominator, `default` where the denominator is 0."""
    num, den = np.broadcast_arrays(as_array(numerator), as_array(denominator))
    out = np.full(num.shape, default, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


@dataclass(frozen=True)
class Moments:
    """One arm's estimate: n units, the estimate, and the per-unit variance (var / n is the estimate's variance)."""

    n: FloatArray
    mean: FloatArray
    var: FloatArray

    @property
    def var_of_mean(self) -> FloatArray:
        """The variance of the estimate; infinite below two units."""
        return np.where(self.n >= 2, ratio_or(self.var, self.n, np.inf), np.inf)


def mean_moments(n: npt.ArrayLike, sx: npt.ArrayLike, sxx: npt.ArrayLike) -> Moments:
    """Mean x̄ = Σx/n and sample variance s² = (Σx² − n·x̄²)/(n − 1)."""
    n_, sx_, sxx_ = as_array(n), as_array(sx), as_array(sxx)
    mean = ratio_or(sx_, n_, 0.0)
    var = np.maximum(ratio_or(sxx_ - sx_ * mean, n_ - 1, np.inf), 0.0)
    return Moments(n_, mean, np.where(n_ >= 2, var, np.inf))


def proportion_moments(n: npt.ArrayLike, sx: npt.ArrayLike) -> Moments:
    """Proportion p = Σx/n of 0/1 values, with the Bernoulli variance p(1 − p)."""
    n_ = as_array(n)
    p = ratio_or(sx, n_, 0.0)
    return Moments(n_, p, np.where(n_ >= 2, p * (1.0 - p), np.inf))


def ratio_moments(
    n: npt.ArrayLike,
    sx: npt.ArrayLike,
    sxx: npt.ArrayLike,
    sy: npt.ArrayLike,
    syy: npt.ArrayLike,
    sxy: npt.ArrayLike,
) -> Moments:
    """Ratio R = Σx/Σy with the delta-method per-unit variance (s²x − 2R·sxy + R²·s²y) / ȳ²."""
    n_, sx_, sy_ = as_array(n), as_array(sx), as_array(sy)
    r = ratio_or(sx_, sy_, 0.0)
    vxx = ratio_or(as_array(sxx) - sx_ * sx_ / np.maximum(n_, 1), n_ - 1, np.inf)
    vyy = ratio_or(as_array(syy) - sy_ * sy_ / np.maximum(n_, 1), n_ - 1, np.inf)
    vxy = ratio_or(as_array(sxy) - sx_ * sy_ / np.maximum(n_, 1), n_ - 1, np.inf)
    ybar = ratio_or(sy_, n_, 0.0)
    var = np.maximum(ratio_or(vxx - 2 * r * vxy + r * r * vyy, ybar * ybar, np.inf), 0.0)
    return Moments(n_, r, np.where((n_ >= 2) & (sy_ != 0), var, np.inf))


class Method(enum.Enum):
    """The fixed-horizon test of a difference."""

    WELCH = "welch"  # t with Welch–Satterthwaite degrees of freedom (MEAN)
    POOLED_Z = "pooled_z"  # two-proportion z-test, pooled under the null (PROPORTION)
    Z = "z"  # normal approximation (RATIO, CUPED-adjusted estimates)


@dataclass(frozen=True)
class FixedTest:
    """A fixed-horizon comparison: effect = T̄ − C̄, lift = effect / |C̄|, their standard errors and the p-value."""

    effect: FloatArray
    se: FloatArray
    p_value: FloatArray
    critical: FloatArray
    lift: FloatArray
    lift_se: FloatArray

    def interval(self) -> tuple[FloatArray, FloatArray]:
        """The confidence interval of the effect."""
        return self.effect - self.critical * self.se, self.effect + self.critical * self.se

    def lift_interval(self) -> tuple[FloatArray, FloatArray]:
        """The confidence interval of the relative lift (delta method)."""
        return self.lift - self.critical * self.lift_se, self.lift + self.critical * self.lift_se


def relative_lift(control: Moments, treatment: Moments) -> tuple[FloatArray, FloatArray]:
    """lift = (T̄ − C̄)/|C̄| and its delta-method standard error √(Var T̄/C̄² + T̄²·Var C̄/C̄⁴); infinite when C̄ = 0."""
    c, t = control.mean, treatment.mean
    lift = ratio_or(t - c, np.abs(c), 0.0)
    c2 = c * c
    with np.errstate(invalid="ignore"):
        var = ratio_or(treatment.var_of_mean, c2, np.inf) + ratio_or(t * t * control.var_of_mean, c2 * c2, np.inf)
    return lift, np.sqrt(np.where(np.isnan(var), np.inf, var))


def fixed_test(control: Moments, treatment: Moments, alpha: float, method: Method) -> FixedTest:
    """The two-sided test of T̄ = C̄ and the quantities of its (1 − alpha) intervals."""
    vc, vt = control.var_of_mean, treatment.var_of_mean
    effect = treatment.mean - control.mean
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        se = np.sqrt(vc + vt)
        if method is Method.WELCH:
            df = (vc + vt) ** 2 / (vc**2 / (control.n - 1) + vt**2 / (treatment.n - 1))
            df = np.where(np.isfinite(df) & (df > 0), df, 1.0)
            critical = as_array(stats.t.ppf(1 - alpha / 2, df))
            null_se = se
        else:
            df = np.full(se.shape, np.inf)
            critical = np.full(se.shape, float(stats.norm.ppf(1 - alpha / 2)))
            null_se = se
            if method is Method.POOLED_Z:
                pooled = ratio_or(control.n * control.mean + treatment.n * treatment.mean, control.n + treatment.n, 0.0)
                null_se = np.sqrt(pooled * (1 - pooled) * (1 / control.n + 1 / treatment.n))
                null_se = np.where(np.isfinite(se), null_se, np.inf)
        stat = ratio_or(np.abs(effect), null_se, np.inf)
        stat = np.where(np.isfinite(null_se), stat, 0.0)
        # Zero variance in both arms: a nonzero difference is certain, none is no evidence.
        stat = np.where((null_se == 0) & (effect == 0), 0.0, stat)
        p_value = np.where(np.isfinite(df), 2 * stats.t.sf(stat, df), 2 * stats.norm.sf(stat))
    lift, lift_se = relative_lift(control, treatment)
    return FixedTest(effect, se, as_array(p_value), critical, lift, lift_se)


def probability_better(effect: npt.ArrayLike, se: npt.ArrayLike, sign: float) -> FloatArray:
    """Normal-approximation posterior (flat prior) that sign·effect > 0: Φ(sign·effect / se)."""
    better, se_ = sign * as_array(effect), as_array(se)
    z = ratio_or(better, se_, 0.0)
    certain = np.where(better > 0, np.inf, np.where(better < 0, -np.inf, 0.0))
    z = np.where(se_ == 0, certain, np.where(np.isfinite(se_), z, 0.0))
    return as_array(stats.norm.cdf(z))
