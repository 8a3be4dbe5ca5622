"""Thompson sampling for bandit experiments: the probability that each arm is best on the reward metric, from
seeded posterior draws, and the arm weights it gives under a floor share and a minimum sample.

Posteriors (one per arm, independent):
- PROPORTION rewards: Beta(1 + successes, 1 + failures), successes = `total`, failures = `units - total`
  (a uniform prior).
- MEAN rewards: the mean's posterior is Normal(m_n, v / (n + K0)) with m_n = (K0·m0 + n·x̄) / (K0 + n), where
  m0 and s0² are the mean and variance pooled over all arms and K0 = 1 pseudo-unit (a weak prior: an arm with
  no data is as uncertain as a single unit). The unit variance v shrinks the arm's sample variance towards s0²
  with the same pseudo-unit, v = ((n − 1)·s² + K0·s0²) / (max(n − 1, 0) + K0), floored at `VARIANCE_FLOOR`
  relative to the squared scale of the data, so that small or constant samples never give a zero-width
  posterior.

probability_best[i] is the share of `draws` joint draws in which arm i is the best (the highest, or the lowest
for METRIC_DIRECTION_DECREASE). The weights are those probabilities under a floor: every arm whose share falls
under `min_share` gets exactly `min_share`, and the rest is shared among the other arms in proportion to their
probabilities (repeated until no arm is under the floor). While any arm has fewer than `min_units` units, the
weights in force stay (`reweighted` is False) and only the probabilities are reported.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fresco.api.experiments.v1 import experiment_pb2 as xpb

PRIOR_UNITS = 1.0  # K0: the weight of the pooled prior of a Gaussian arm, in units
VARIANCE_FLOOR = 1e-12  # the least unit variance of a Gaussian arm, relative to max(1, mean²) of the data
DEFAULT_MIN_SHARE = 0.05  # BanditSettings.min_arm_share when 0
DEFAULT_MIN_UNITS = 100  # BanditSettings.min_units_per_arm when 0


@dataclass(frozen=True)
class ArmReward:
    """One arm's reward so far: `units` exposed units, the sum of their rewards and of its squares."""

    name: str
    units: int
    total: float
    total_squares: float = 0.0  # unused for PROPORTION rewards (a 0/1 reward's square is itself)


@dataclass(frozen=True)
class BanditWeights:
    """The outcome of one Thompson-sampling round, in arm order."""

    weights: tuple[float, ...]  # the weights to publish: sum 1, each at least the floor share
    probability_best: tuple[float, ...]  # P(arm is best | data), from the seeded draws; sums to 1
    reweighted: bool  # False while some arm has fewer than min_units units: `weights` are the current ones


def limits(settings: xpb.BanditSettings) -> tuple[float, int]:
    """(min_share, min_units) of a bandit's settings, with the contract's defaults for zeros."""
    return settings.min_arm_share or DEFAULT_MIN_SHARE, settings.min_units_per_arm or DEFAULT_MIN_UNITS


def seed_for(key: str, phase: int, allocation: int) -> int:
    """The draws' seed for an experiment's allocation: a SHA-256 of its identity, the same in every process."""
    digest = hashlib.sha256(f"fresco-bandit\x1f{key}\x1f{phase}\x1f{allocation}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def thompson(
    arms: Sequence[ArmReward],
    kind: int,
    direction: int,
    min_share: float,
    min_units: int,
    seed: int,
    draws: int = 20_000,
    *,
    current: Sequence[float] | None = None,
) -> BanditWeights:
    """The arms' probabilities of being best and the floored weights they give (module docstring).

    `kind` is a MetricKind (PROPORTION or MEAN; UNSPECIFIED counts as MEAN), `direction` a MetricDirection;
    `current` are the weights in force, kept while some arm is under `min_units` (equal weights when not given).
    Raises ValueError naming the offending field."""
    k = len(arms)
    if k < 1:
        raise ValueError("arms: expected at least one arm")
    if not min_share >= 0.0 or not min_share * k <= 1.0 + 1e-12:
        raise ValueError(f"bandit.min_arm_share: expected a share in [0, 1/{k}] for {k} arms, got {min_share}")
    if min_units < 0:
        raise ValueError(f"bandit.min_units_per_arm: expected a non-negative count, got {min_units}")
    if draws < 1:
        raise ValueError(f"draws: expected a positive number of draws, got {draws}")
    weights_now = _current(current, k)
    samples = _draws(arms, kind, np.random.default_rng(seed), draws)
    best = samples.argmin(axis=1) if direction == xpb.METRIC_DIRECTION_DECREASE else samples.argmax(axis=1)
    probability = tuple(float(c) / draws for c in np.bincount(best, minlength=k))
    if any(arm.units < min_units for arm in arms):
        return BanditWeights(weights_now, probability, reweighted=False)
    return BanditWeights(floored(probability, min_share), probability, reweighted=True)


def floored(probability: Sequence[float], min_share: float) -> tuple[float, ...]:
    """Weights from probabilities with every arm at `min_share` or more; above the floor, weights keep the
    probabilities' proportions."""
    k = len(probability)
    weights = [0.0] * k
    free = set(range(k))  # arms not pinned at the floor
    while free:
        mass = 1.0 - (k - len(free)) * min_share
        total = sum(probability[i] for i in free)
        for i in free:
            weights[i] = mass * probability[i] / total if total > 0.0 else mass / len(free)
        under = {i for i in free if weights[i] < min_share}
        if not under:
            break
        for i in under:
            weights[i] = min_share
        free -= under
    return tuple(weights)


def _current(current: Sequence[float] | None, k: int) -> tuple[float, ...]:
    if current is None:
        return (1.0 / k,) * k
    if len(current) != k:
        raise ValueError(f"current: expected {k} weights, one per arm, got {len(current)}")
    if any(not (w >= 0.0 and math.isfinite(w)) for w in current) or not math.isclose(sum(current), 1.0, abs_tol=1e-6):
        raise ValueError(f"current: expected non-negative weights summing to 1, got {list(current)}")
    return tuple(float(w) for w in current)


def _draws(arms: Sequence[ArmReward], kind: int, rng: np.random.Generator, draws: int) -> np.ndarray:
    """`draws` joint samples of the arms' mean rewards from their posteriors, shape (draws, arms)."""
    for arm in arms:
        if arm.units < 0 or not math.isfinite(arm.total) or not math.isfinite(arm.total_squares):
            raise ValueError(f"arms[{arm.name}]: expected a non-negative unit count and finite sums")
    units = np.array([arm.units for arm in arms], dtype=float)
    total = np.array([arm.total for arm in arms], dtype=float)
    if kind == xpb.METRIC_KIND_PROPORTION:
        for arm in arms:
            if not 0.0 <= arm.total <= arm.units:
                raise ValueError(
                    f"arms[{arm.name}].total: expected successes in [0, units={arm.units}], got {arm.total}"
                )
        return rng.beta(1.0 + total, 1.0 + units - total, size=(draws, len(arms)))
    if kind not in (xpb.METRIC_KIND_MEAN, xpb.METRIC_KIND_UNSPECIFIED):
        raise ValueError(f"bandit.reward_metric: expected a PROPORTION or MEAN metric, got kind {kind}")
    squares = np.array([arm.total_squares for arm in arms], dtype=float)
    mean, sd = _gaussian_posterior(units, total, squares)
    return rng.normal(mean, sd, size=(draws, len(arms)))


def _gaussian_posterior(units: np.ndarray, total: np.ndarray, squares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each arm's posterior mean and standard deviation of its mean reward (module docstring)."""
    n_all = units.sum()
    m0 = total.sum() / n_all if n_all > 0 else 0.0
    s0 = (squares.sum() - n_all * m0 * m0) / (n_all - 1) if n_all > 1 else 1.0
    floor = VARIANCE_FLOOR * max(1.0, m0 * m0)
    s0 = max(s0, floor)
    safe_n = np.maximum(units, 1.0)
    arm_mean = np.where(units > 0, total / safe_n, m0)
    # Sum of squared deviations from the arm's own mean; rounding can make it slightly negative.
    ss = np.maximum(squares - units * arm_mean * arm_mean, 0.0)
    variance = np.maximum((ss + PRIOR_UNITS * s0) / (np.maximum(units - 1.0, 0.0) + PRIOR_UNITS), floor)
    posterior_mean = (PRIOR_UNITS * m0 + units * arm_mean) / (PRIOR_UNITS + units)
    return posterior_mean, np.sqrt(variance / (PRIOR_UNITS + units))
