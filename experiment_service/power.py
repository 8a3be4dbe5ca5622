"""Power and minimum sample for a two-arm comparison at a relative minimum detectable effect.

With control mean μ, per-unit variances σ²_C (control) and σ²_T (treatment at the effect; σ²_C for MEAN and
RATIO, p_T(1 − p_T) for PROPORTION), δ = MDE·|μ| and z_q the standard normal quantile:

    required units per arm  n = ⌈(z₁₋α/₂ + z_power)² · (σ²_C + σ²_T) / δ²⌉
    achieved power          Φ(δ/SE − z₁₋α/₂) + Φ(−δ/SE − z₁₋α/₂),  SE = √(σ²_C/n_C + σ²_T/n_T)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class Plan:
    """The sample a comparison needs at the minimum detectable effect, and the power reached at the current one."""

    minimum_detectable_effect: float
    required_units_per_arm: int
    achieved_power: float


def treatment_variance(control_mean: float, control_variance: float, mde: float, proportion: bool) -> float:
    """The treatment's per-unit variance at the effect: p_T(1 − p_T) for a proportion, else control's."""
    if not proportion:
        return control_variance
    p = min(max(control_mean * (1.0 + mde), 0.0), 1.0)
    return p * (1.0 - p)


def required_units_per_arm(
    alpha: float, power: float, mde: float, control_mean: float, control_variance: float, variance_t: float
) -> int:
    """Units per arm for a two-sided test at alpha to reach `power` at a relative effect `mde`; 0 if undefined."""
    delta = abs(mde * control_mean)
    total_variance = control_variance + variance_t
    if delta == 0 or not math.isfinite(total_variance) or total_variance <= 0:
        return 0
    z = float(stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power))
    return math.ceil(z * z * total_variance / (delta * delta))


def achieved_power(
    alpha: float,
    mde: float,
    control_mean: float,
    control_variance: float,
    variance_t: float,
    n_control: float,
    n_treatment: float,
) -> float:
    """The power of the two-sided test at alpha for a relative effect `mde` with the current units."""
    delta = abs(mde * control_mean)
    if delta == 0 or n_control < 2 or n_treatment < 2:
        return 0.0
    se = math.sqrt(control_variance / n_control + variance_t / n_treatment)
    if not math.isfinite(se):
        return 0.0
    if se == 0:
        return 1.0
    z = float(stats.norm.ppf(1 - alpha / 2))
    return float(stats.norm.cdf(delta / se - z) + stats.norm.cdf(-delta / se - z))


def plan(
    alpha: float,
    power: float,
    mde: float,
    control_mean: float,
    control_variance: float,
    proportion: bool,
    n_control: float,
    n_treatment: float,
    sign: float = 1.0,
) -> Plan:
    """The power plan of one metric; `sign` is −1 when a decrease is the improvement (a proportion's p_T moves down)."""
    if mde <= 0 or not math.isfinite(control_variance):
        return Plan(mde, 0, 0.0)
    variance_t = treatment_variance(control_mean, control_variance, sign * mde, proportion)
    return Plan(
        mde,
        required_units_per_arm(alpha, power, mde, control_mean, control_variance, variance_t),
        achieved_power(alpha, mde, control_mean, control_variance, variance_t, n_control, n_treatment),
    )
