"""Always-valid inference: asymptotic confidence sequences (Waudby-Smith, Ramdas et al., "Time-uniform central
limit theory and asymptotic confidence sequences") with the two-sided Gaussian-mixture boundary.

For an estimate θ̂ₙ after n units with standard error SEₙ (so σ̂² ≈ n·SEₙ²), the sequence

    θ̂ₙ ± SEₙ · √( (nρ² + 1)/(nρ²) · 2·log(√(nρ² + 1)/α) )

covers θ at every n simultaneously with probability ≥ 1 − α (asymptotically), however often it is looked at.
ρ is tuned so that the sequence is tightest at a planned sample n*: ρ² = (−2·log α + log(1 − 2·log α)) / n*.
The always-valid p-value is the smallest α whose sequence excludes 0:

    pₙ = min(1, √(nρ² + 1) · exp(−z²·nρ² / (2(nρ² + 1)))),  z = θ̂ₙ / SEₙ.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from experiment_service.frequentist import FloatArray, as_array


def tuned_rho_squared(alpha: float, planned_units: float) -> float:
    """The mixture precision ρ² that makes the sequence narrowest at `planned_units` units."""
    c = -2.0 * math.log(alpha)
    return (c + math.log(1.0 + c)) / max(planned_units, 1.0)


def boundary_multiplier(n: npt.ArrayLike, rho_squared: float, alpha: float) -> FloatArray:
    """The factor applied to the standard error at n units (the fixed-horizon analogue is z₁₋α/₂)."""
    u = np.maximum(as_array(n), 1.0) * rho_squared
    return as_array(np.sqrt((u + 1.0) / u * (np.log(u + 1.0) - 2.0 * math.log(alpha))))


def confidence_sequence(
    estimate: npt.ArrayLike, se: npt.ArrayLike, n: npt.ArrayLike, rho_squared: float, alpha: float
) -> tuple[FloatArray, FloatArray]:
    """The (1 − alpha) confidence sequence around `estimate` at n units; unbounded where se is infinite."""
    est, se_ = as_array(estimate), as_array(se)
    half = se_ * boundary_multiplier(n, rho_squared, alpha)
    half = np.where(np.isfinite(half), half, np.inf)
    return est - half, est + half


def always_valid_p_value(
    estimate: npt.ArrayLike, se: npt.ArrayLike, n: npt.ArrayLike, rho_squared: float
) -> FloatArray:
    """The smallest alpha whose confidence sequence (at this ρ²) excludes 0."""
    est, se_ = as_array(estimate), as_array(se)
    u = np.maximum(as_array(n), 1.0) * rho_squared
    with np.errstate(divide="ignore", invalid="ignore"):
        z2 = np.where(se_ > 0, (est / se_) ** 2, np.where(est == 0, 0.0, np.inf))
        z2 = np.where(np.isfinite(se_), z2, 0.0)
        p = np.sqrt(u + 1.0) * np.exp(-z2 * u / (2.0 * (u + 1.0)))
    return as_array(np.minimum(p, 1.0))
