"""Sample-ratio mismatch: are the units per arm what the weights in force when they were assigned imply?

Expected units of arm i: Eᵢ = Σₐ nₐ · wᵢₐ / Wₐ over allocations a (an A/B phase has one; a bandit one per
re-weighting), nₐ the units assigned under allocation a and Wₐ its total weight. χ² = Σᵢ (Oᵢ − Eᵢ)²/Eᵢ over arms
with Eᵢ > 0, k − 1 degrees of freedom. The check fires when p < threshold (0.001) and the largest relative
deviation |Oᵢ − Eᵢ|/Eᵢ exceeds the minimum (0.01), and always when an arm expected to have units (Eᵢ ≥ 5) has
none or an arm of weight 0 has some.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import stats

from experiment_service.frequentist import FloatArray, as_array

# An arm expected to hold at least this many units, holding none, is a mismatch whatever the test says.
EMPTY_ARM_MIN_EXPECTED = 5.0


@dataclass(frozen=True)
class SampleRatio:
    """The check's statistic, p-value, largest relative deviation, verdict and per-arm counts."""

    chi_square: float
    p_value: float
    max_relative_deviation: float
    mismatch: bool
    expected: tuple[float, ...]
    observed: tuple[int, ...]


def expected_units(
    units_by_allocation: Sequence[Mapping[int, int]], weights_by_allocation: Mapping[int, Sequence[float]]
) -> list[float]:
    """Eᵢ for every arm from each arm's units per allocation and the weights of every allocation."""
    arms = len(units_by_allocation)
    totals: dict[int, int] = {}
    for units in units_by_allocation:
        for allocation, count in units.items():
            totals[allocation] = totals.get(allocation, 0) + count
    expected = [0.0] * arms
    for allocation, total in sorted(totals.items()):
        if total == 0:
            continue
        weights = weights_by_allocation.get(allocation)
        if weights is None:
            raise ValueError(f"weights_by_allocation has no weights for allocation {allocation}")
        if len(weights) != arms:
            raise ValueError(f"allocation {allocation} has {len(weights)} weights for {arms} arms")
        weight_total = float(sum(weights))
        if weight_total <= 0:
            raise ValueError(f"allocation {allocation} has weights summing to {weight_total}, expected > 0")
        for i, weight in enumerate(weights):
            expected[i] += total * weight / weight_total
    return expected


def chi_square(observed: npt.ArrayLike, expected: npt.ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
    """χ², its p-value and the largest relative deviation, over arms on the last axis with expected > 0."""
    obs, exp = np.broadcast_arrays(as_array(observed), as_array(expected))
    positive = exp > 0
    safe = np.where(positive, exp, 1.0)
    chi2 = np.where(positive, (obs - exp) ** 2 / safe, 0.0).sum(axis=-1)
    deviation = np.where(positive, np.abs(obs - exp) / safe, 0.0).max(axis=-1)
    df = np.maximum(positive.sum(axis=-1) - 1, 1)
    return as_array(chi2), as_array(stats.chi2.sf(chi2, df)), as_array(deviation)


def mismatch(
    observed: npt.ArrayLike, expected: npt.ArrayLike, p_threshold: float, min_deviation: float
) -> npt.NDArray[np.bool_]:
    """Whether the check fires, elementwise over leading axes."""
    obs, exp = np.broadcast_arrays(as_array(observed), as_array(expected))
    _, p_value, deviation = chi_square(obs, exp)
    empty = ((exp >= EMPTY_ARM_MIN_EXPECTED) & (obs == 0)).any(axis=-1)
    unexpected = ((exp == 0) & (obs > 0)).any(axis=-1)
    return np.asarray(((p_value < p_threshold) & (deviation > min_deviation)) | empty | unexpected, dtype=np.bool_)


def sample_ratio(
    observed: Sequence[int], expected: Sequence[float], p_threshold: float, min_deviation: float
) -> SampleRatio:
    """The check for one experiment phase."""
    chi2, p_value, deviation = chi_square(observed, expected)
    fires = bool(mismatch(observed, expected, p_threshold, min_deviation))
    if sum(observed) == 0:
        return SampleRatio(0.0, 1.0, 0.0, False, tuple(expected), tuple(observed))
    return SampleRatio(float(chi2), float(p_value), float(deviation), fires, tuple(expected), tuple(observed))
