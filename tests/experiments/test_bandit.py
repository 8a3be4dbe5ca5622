"""Thompson sampling by simulation (seeded): Bernoulli and Gaussian bandits concentrate on the best arm and keep
the floor share, DECREASE picks the lowest, nothing moves before the minimum sample, the probabilities are
deterministic for a seed; the floor, the seed and the validation of bad settings."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest

from experiment_service.bandit import ArmReward, BanditWeights, floored, limits, seed_for, thompson
from fresco.api.experiments.v1 import experiment_pb2 as xpb

PROPORTION, MEAN = xpb.METRIC_KIND_PROPORTION, xpb.METRIC_KIND_MEAN
INCREASE, DECREASE = xpb.METRIC_DIRECTION_INCREASE, xpb.METRIC_DIRECTION_DECREASE
Sampler = Callable[[np.random.Generator, int, int], np.ndarray]  # (rng, arm, units) -> the units' rewards


def simulate(
    sample: Sampler,
    kind: int,
    direction: int = INCREASE,
    rounds: int = 30,
    per_round: int = 400,
    min_share: float = 0.05,
    min_units: int = 100,
    seed: int = 7,
) -> list[BanditWeights]:
    """Rounds of assigning `per_round` new units by the weights in force, then re-weighting: every round's result."""
    rng = np.random.default_rng(seed)
    units, total, squares = np.zeros(3), np.zeros(3), np.zeros(3)
    weights: tuple[float, ...] = (1 / 3, 1 / 3, 1 / 3)
    history = []
    for r in range(rounds):
        for arm, n in enumerate(rng.multinomial(per_round, weights)):
            x = sample(rng, arm, int(n))
            units[arm] += n
            total[arm] += x.sum()
            squares[arm] += (x * x).sum()
        rewards = [ArmReward(f"arm{i}", int(units[i]), float(total[i]), float(squares[i])) for i in range(3)]
        result = thompson(rewards, kind, direction, min_share, min_units, seed_for("sim", 1, r), current=weights)
        weights = result.weights
        history.append(result)
    return history


def bernoulli(p: Sequence[float]) -> Sampler:
    return lambda rng, arm, n: rng.binomial(1, p[arm], n).astype(float)


def gaussian(mu: Sequence[float], sd: float = 1.0) -> Sampler:
    return lambda rng, arm, n: rng.normal(mu[arm], sd, n)


def assert_floor_kept(history: Sequence[BanditWeights], min_share: float) -> None:
    for result in history:
        assert min(result.weights) >= min_share - 1e-12
        assert sum(result.weights) == pytest.approx(1.0, abs=1e-9)
        assert sum(result.probability_best) == pytest.approx(1.0, abs=1e-9)


def test_a_bernoulli_bandit_concentrates_on_the_best_arm_and_keeps_the_floor() -> None:
    history = simulate(bernoulli([0.10, 0.12, 0.15]), PROPORTION)
    assert_floor_kept(history, 0.05)
    assert history[-1].weights[2] > 0.7
    assert history[-1].probability_best[2] > 0.7
    assert all(r.reweighted for r in history)
    # The floor binds: the weaker arms sit at exactly their share, still sampled.
    assert history[-1].weights[:2] == pytest.approx((0.05, 0.05))


def test_a_gaussian_bandit_concentrates_on_the_highest_mean() -> None:
    history = simulate(gaussian([1.0, 1.1, 1.3]), MEAN, rounds=15, min_share=0.1)
    assert_floor_kept(history, 0.1)
    assert history[-1].weights[2] > 0.7


def test_decrease_concentrates_on_the_lowest_mean() -> None:
    history = simulate(gaussian([1.0, 1.1, 1.3]), MEAN, DECREASE, rounds=15)
    assert_floor_kept(history, 0.05)
    assert history[-1].weights[0] > 0.7


def test_decrease_on_proportions_picks_the_lowest_rate() -> None:
    arms = [ArmReward("a", 2000, 300), ArmReward("b", 2000, 200), ArmReward("c", 2000, 240)]
    result = thompson(arms, PROPORTION, DECREASE, 0.05, 100, seed=1)
    assert result.probability_best[1] > 0.95
    assert result.weights == pytest.approx((0.05, 0.9, 0.05))


def test_no_reweighting_before_every_arm_has_its_minimum_sample() -> None:
    current = (0.5, 0.3, 0.2)
    arms = [ArmReward("a", 500, 50), ArmReward("b", 500, 100), ArmReward("c", 99, 15)]
    held = thompson(arms, PROPORTION, INCREASE, 0.05, 100, seed=3, current=current)
    assert not held.reweighted
    assert held.weights == current
    assert held.probability_best[1] > 0.5  # still reported
    arms[2] = ArmReward("c", 100, 15)
    moved = thompson(arms, PROPORTION, INCREASE, 0.05, 100, seed=3, current=current)
    assert moved.reweighted
    assert moved.weights != current
    # The simulation holds too: with 60 units a round, min_units=100 keeps the first rounds at the start.
    history = simulate(bernoulli([0.10, 0.12, 0.15]), PROPORTION, rounds=8, per_round=60, min_units=100)
    assert not history[0].reweighted
    assert history[0].weights == (1 / 3, 1 / 3, 1 / 3)
    assert history[-1].reweighted


def test_probability_best_is_deterministic_for_a_seed_and_sums_to_one() -> None:
    arms = [ArmReward("a", 300, 30), ArmReward("b", 300, 36), ArmReward("c", 300, 33)]
    first = thompson(arms, PROPORTION, INCREASE, 0.05, 100, seed=seed_for("exp", 1, 2))
    again = thompson(arms, PROPORTION, INCREASE, 0.05, 100, seed=seed_for("exp", 1, 2))
    other = thompson(arms, PROPORTION, INCREASE, 0.05, 100, seed=seed_for("exp", 1, 3))
    assert first == again
    assert first.probability_best != other.probability_best
    assert sum(first.probability_best) == pytest.approx(1.0, abs=1e-12)
    assert first.probability_best == pytest.approx(other.probability_best, abs=0.02)  # sampling noise only


def test_arms_with_the_same_data_are_equally_likely_to_be_best() -> None:
    for kind, arms in [
        (PROPORTION, [ArmReward(n, 1000, 100) for n in "abcd"]),
        (MEAN, [ArmReward(n, 1000, 2000.0, 5000.0) for n in "abcd"]),
        (MEAN, [ArmReward(n, 0, 0.0, 0.0) for n in "abcd"]),  # no data at all: the prior alone
    ]:
        result = thompson(arms, kind, INCREASE, 0.0, 0, seed=11, draws=40_000)
        assert result.probability_best == pytest.approx((0.25,) * 4, abs=0.015)


def test_the_gaussian_posterior_tightens_with_units() -> None:
    # The same means (1.0 vs 1.1, unit variance): more units, more confidence in the better arm.
    def arms(n: int) -> list[ArmReward]:
        return [ArmReward(name, n, mean * n, n * (1.0 + mean * mean)) for name, mean in (("a", 1.0), ("b", 1.1))]

    few, many = (thompson(arms(n), MEAN, INCREASE, 0.0, 0, seed=5).probability_best[1] for n in (20, 2000))
    # P(b best) = Φ(0.1 / sqrt(2/n)): about 0.62 at n=20 and 0.9987 at n=2000.
    assert 0.55 < few < 0.70
    assert many > 0.99


def test_a_constant_reward_gives_no_zero_width_posterior() -> None:
    arms = [ArmReward("a", 1, 3.0, 9.0), ArmReward("b", 1, 3.0, 9.0)]
    result = thompson(arms, MEAN, INCREASE, 0.1, 1, seed=2)
    assert result.probability_best == pytest.approx((0.5, 0.5), abs=0.02)


def test_the_floor_keeps_proportions_above_it() -> None:
    assert floored((0.98, 0.01, 0.01), 0.05) == pytest.approx((0.9, 0.05, 0.05))
    assert floored((0.6, 0.3, 0.1), 0.05) == pytest.approx((0.6, 0.3, 0.1))
    assert floored((0.5, 0.49, 0.01), 0.1) == pytest.approx((0.9 * 0.5 / 0.99, 0.9 * 0.49 / 0.99, 0.1))
    # Pinning one arm can push another under the floor: both end at it.
    assert floored((0.80, 0.12, 0.08), 0.125) == pytest.approx((0.75, 0.125, 0.125))
    assert floored((1.0, 0.0), 0.5) == pytest.approx((0.5, 0.5))
    assert floored((0.0, 0.0, 1.0), 0.0) == (0.0, 0.0, 1.0)


def test_the_seed_is_stable_across_processes() -> None:
    # A SHA-256 of the identity, not Python's per-process salted hash(): this value holds everywhere.
    assert seed_for("checkout-bandit", 2, 5) == 12679370218657863340
    assert len({seed_for("k", p, a) for p in (1, 2) for a in (0, 1, 2)}) == 6


def test_limits_take_the_contracts_defaults_for_zeros() -> None:
    assert limits(xpb.BanditSettings()) == (0.05, 100)
    assert limits(xpb.BanditSettings(min_arm_share=0.1, min_units_per_arm=500)) == (0.1, 500)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: thompson([ArmReward("a", 1, 0)] * 3, PROPORTION, INCREASE, 0.4, 0, 1), "bandit.min_arm_share"),
        (lambda: thompson([ArmReward("a", 1, 0)] * 2, PROPORTION, INCREASE, -0.1, 0, 1), "bandit.min_arm_share"),
        (lambda: thompson([ArmReward("a", 1, 0)] * 2, PROPORTION, INCREASE, 0.1, -1, 1), "bandit.min_units_per_arm"),
        (lambda: thompson([ArmReward("a", 10, 11)], PROPORTION, INCREASE, 0.0, 0, 1), r"arms\[a\].total"),
        (lambda: thompson([ArmReward("b", -1, 0)], MEAN, INCREASE, 0.0, 0, 1), r"arms\[b\]"),
        (lambda: thompson([ArmReward("a", 1, 1)], xpb.METRIC_KIND_RATIO, INCREASE, 0.0, 0, 1), "bandit.reward_metric"),
        (lambda: thompson([], MEAN, INCREASE, 0.0, 0, 1), "arms"),
        (lambda: thompson([ArmReward("a", 1, 1)] * 2, MEAN, INCREASE, 0.0, 0, 1, current=(1.0,)), "current"),
        (lambda: thompson([ArmReward("a", 1, 1)] * 2, MEAN, INCREASE, 0.0, 0, 1, current=(0.7, 0.7)), "current"),
        (lambda: thompson([ArmReward("a", 1, 1)], MEAN, INCREASE, 0.0, 0, 1, draws=0), "draws"),
    ],
)
def test_bad_settings_raise_naming_the_field(call: Callable[[], object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        call()
