"""CUPED (Deng et al., 2013): variance reduction with a pre-exposure covariate y.

θ = Σₐ cov_a(x, y)·(nₐ − 1) / Σₐ var_a(y)·(nₐ − 1), pooled within arms; arm a's adjusted mean is
x̄ₐ − θ(ȳₐ − ȳ), ȳ the mean of y over every arm, and its per-unit variance s²x − 2θ·sxy + θ²·s²y.
A unit without pre-exposure data carries y = 0. That keeps the estimate unbiased: y and whether it exists are
fixed before exposure, so they are independent of the arm and E[ȳ_T − ȳ_C] = 0 for any θ; missing data only
weakens the correlation, and with it the reduction. Arrays have the arms on their last axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from experiment_service.frequentist import FloatArray, Moments, as_array, ratio_or


@dataclass(frozen=True)
class Adjusted:
    """The CUPED estimates: θ, the adjusted moments and the raw (sample-variance) moments of every arm."""

    theta: FloatArray
    adjusted: Moments
    raw: Moments


def cuped(
    n: npt.ArrayLike,
    sx: npt.ArrayLike,
    sxx: npt.ArrayLike,
    sy: npt.ArrayLike,
    syy: npt.ArrayLike,
    sxy: npt.ArrayLike,
) -> Adjusted:
    """Adjust every arm (last axis) by the covariate; θ = 0 when y does not vary."""
    n_, sx_, sy_ = as_array(n), as_array(sx), as_array(sy)
    safe_n = np.maximum(n_, 1.0)
    cxx = as_array(sxx) - sx_ * sx_ / safe_n
    cyy = as_array(syy) - sy_ * sy_ / safe_n
    cxy = as_array(sxy) - sx_ * sy_ / safe_n
    theta = ratio_or(cxy.sum(axis=-1), cyy.sum(axis=-1), 0.0)
    t = theta[..., np.newaxis]
    ybar = ratio_or(sy_.sum(axis=-1), n_.sum(axis=-1), 0.0)[..., np.newaxis]
    xbar = ratio_or(sx_, n_, 0.0)
    adjusted_mean = np.where(n_ > 0, xbar - t * (ratio_or(sy_, n_, 0.0) - ybar), 0.0)
    usable = n_ >= 2
    raw_var = np.where(usable, np.maximum(ratio_or(cxx, n_ - 1, np.inf), 0.0), np.inf)
    adjusted_var = np.where(usable, np.maximum(ratio_or(cxx - 2 * t * cxy + t * t * cyy, n_ - 1, np.inf), 0.0), np.inf)
    return Adjusted(theta, Moments(n_, adjusted_mean, adjusted_var), Moments(n_, xbar, raw_var))


def variance_reduction(adjusted: Adjusted, control: int, treatment: int) -> FloatArray:
    """1 − Var(adjusted difference)/Var(raw difference) between two arms (indices on the last axis)."""
    a, r = adjusted.adjusted, adjusted.raw
    var_adjusted = a.var_of_mean[..., control] + a.var_of_mean[..., treatment]
    var_raw = r.var_of_mean[..., control] + r.var_of_mean[..., treatment]
    reduction = 1.0 - ratio_or(var_adjusted, var_raw, 1.0)
    return as_array(np.where(np.isfinite(var_raw) & np.isfinite(var_adjusted), reduction, 0.0))
