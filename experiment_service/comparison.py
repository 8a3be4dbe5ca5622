"""One treatment against control on one metric: the fixed-horizon test, the relative lift with its interval and
confidence sequence, the always-valid p-value and the probability to beat control, elementwise on arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from experiment_service.frequentist import (
    FixedTest,
    FloatArray,
    Method,
    Moments,
    fixed_test,
    mean_moments,
    probability_better,
    proportion_moments,
    ratio_moments,
)
from experiment_service.sequential import always_valid_p_value, confidence_sequence
from fresco.api.experiments.v1 import experiment_pb2

PROPORTION = experiment_pb2.METRIC_KIND_PROPORTION
RATIO = experiment_pb2.METRIC_KIND_RATIO
# The central limit theorem behind the confidence sequences needs a sample: until every arm has this many units
# (and a proportion this many units with and without the event), the sequence is unbounded. Without the burn-in,
# a 90/10 split peeked at from its first 100 units rejects a true null in ~6% of runs at alpha = 5%.
SEQUENTIAL_MIN_UNITS = 100
SEQUENTIAL_MIN_EVENTS = 10


def method_for(kind: int, cuped_applied: bool) -> Method:
    """The fixed-horizon test of a metric kind (a CUPED-adjusted estimate is tested as a normal mean)."""
    if cuped_applied or kind == RATIO:
        return Method.Z
    return Method.POOLED_Z if kind == PROPORTION else Method.WELCH


def arm_moments(
    kind: int,
    n: npt.ArrayLike,
    sx: npt.ArrayLike,
    sxx: npt.ArrayLike,
    sy: npt.ArrayLike,
    syy: npt.ArrayLike,
    sxy: npt.ArrayLike,
) -> Moments:
    """The raw estimate of a metric kind from its sufficient statistics."""
    if kind == PROPORTION:
        return proportion_moments(n, sx)
    if kind == RATIO:
        return ratio_moments(n, sx, sxx, sy, syy, sxy)
    return mean_moments(n, sx, sxx)


def take(moments: Moments, index: int) -> Moments:
    """One arm's moments out of moments with the arms on the last axis."""
    return Moments(moments.n[..., index], moments.mean[..., index], moments.var[..., index])


@dataclass(frozen=True)
class Contrast:
    """Everything compared for one treatment: the fixed test, both intervals of the lift and the sequential p-value."""

    fixed: FixedTest
    interval: tuple[FloatArray, FloatArray]
    sequential_interval: tuple[FloatArray, FloatArray]
    sequential_p_value: FloatArray
    probability_to_beat_control: FloatArray


def burned_in(moments: Moments, binary: bool) -> npt.NDArray[np.bool_]:
    """Whether an arm has the sample the confidence sequence needs."""
    ready = moments.n >= SEQUENTIAL_MIN_UNITS
    if binary:
        events = moments.n * moments.mean
        ready = ready & (np.minimum(events, moments.n - events) >= SEQUENTIAL_MIN_EVENTS - 1e-9)
    return np.asarray(ready, dtype=np.bool_)


def contrast(
    control: Moments,
    treatment: Moments,
    method: Method,
    alpha: float,
    rho_squared: float,
    sign: float,
    binary: bool = False,
) -> Contrast:
    """Compare; the sequence runs on n = both arms' units. `sign` is −1 when a decrease is better; `binary` says the
    values are 0/1 (a PROPORTION), whose sequence also waits for events."""
    test = fixed_test(control, treatment, alpha, method)
    n = control.n + treatment.n
    ready = burned_in(control, binary) & burned_in(treatment, binary)
    se = np.where(ready, test.lift_se, np.inf)
    return Contrast(
        fixed=test,
        interval=test.lift_interval(),
        sequential_interval=confidence_sequence(test.lift, se, n, rho_squared, alpha),
        sequential_p_value=always_valid_p_value(test.lift, se, n, rho_squared),
        probability_to_beat_control=probability_better(test.effect, test.se, sign),
    )


def excludes_zero(interval: tuple[FloatArray, FloatArray]) -> npt.NDArray[np.bool_]:
    """Whether an interval lies wholly on one side of 0."""
    lower, upper = interval
    return (lower > 0) | (upper < 0)
