"""The analysis of one experiment phase: per-arm summaries, comparisons with control, power, sample ratio and the
decision, all in one results_pb2.ExperimentResults. Pure: statistics in, results out."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from experiment_service import bandit, power, srm
from experiment_service.comparison import arm_moments, contrast, excludes_zero, method_for, take
from experiment_service.cuped import Adjusted, cuped, variance_reduction
from experiment_service.decision import decide, improvement_bounds, margin_of
from experiment_service.frequentist import Method, Moments, probability_better
from experiment_service.sequential import tuned_rho_squared
from experiment_service.significance import Significance
from experiment_service.sufficient import SufficientStats
from fresco.api.experiments.v1 import experiment_pb2, results_pb2

GUARDING_ROLES = (experiment_pb2.METRIC_ROLE_GUARDRAIL, experiment_pb2.METRIC_ROLE_LATENCY)
SUCCESS_ROLES = (experiment_pb2.METRIC_ROLE_SUCCESS, experiment_pb2.METRIC_ROLE_UNSPECIFIED)
# Monte Carlo draws for the probability that each of three or more arms is best (two arms have a closed form).
BEST_ARM_DRAWS = 20_000


@dataclass(frozen=True)
class ArmData:
    """One arm's statistics per metric name and its exposed units per allocation (A/B tests: allocation 0)."""

    name: str
    metrics: Mapping[str, SufficientStats] = field(default_factory=dict)
    units_by_allocation: Mapping[int, int] = field(default_factory=dict)

    @property
    def units(self) -> int:
        """Distinct exposed units of the arm in the phase."""
        return sum(self.units_by_allocation.values())


@dataclass(frozen=True)
class MetricData:
    """One metric across arms: raw statistics, the estimates decisions use (CUPED-adjusted when it applies)."""

    spec: experiment_pb2.MetricSpec
    stats: tuple[SufficientStats, ...]
    raw: Moments
    used: Moments
    adjusted: Adjusted | None
    method: Method

    @property
    def sign(self) -> float:
        """−1 when a decrease is the improvement."""
        return -1.0 if self.spec.direction == experiment_pb2.METRIC_DIRECTION_DECREASE else 1.0

    @property
    def binary(self) -> bool:
        """Whether unit values are 0/1."""
        return self.spec.kind == experiment_pb2.METRIC_KIND_PROPORTION


def metric_data(spec: experiment_pb2.MetricSpec, stats: Sequence[SufficientStats]) -> MetricData:
    """Estimate one metric in every arm; CUPED applies to PROPORTION/MEAN metrics with covariate data that varies."""
    kind = spec.kind or experiment_pb2.METRIC_KIND_MEAN
    columns = [
        np.array([getattr(s, f) for s in stats], dtype=np.float64) for f in ("n", "sx", "sxx", "sy", "syy", "sxy")
    ]
    raw = arm_moments(kind, *columns)
    adjusted = None
    if spec.HasField("cuped") and kind != experiment_pb2.METRIC_KIND_RATIO and any(s.n_y for s in stats):
        candidate = cuped(*columns)
        adjusted = candidate if float(candidate.theta) != 0.0 else None
    used = adjusted.adjusted if adjusted else raw
    return MetricData(spec, tuple(stats), raw, used, adjusted, method_for(kind, adjusted is not None))


def _finite(value: float) -> float:
    return value if np.isfinite(value) else 0.0


def _summaries(data: MetricData, names: Sequence[str]) -> list[results_pb2.MetricSummary]:
    return [
        results_pb2.MetricSummary(
            arm_name=name,
            units=s.n,
            sum=s.sx,
            sum_squares=s.sxx,
            denominator_sum=s.sy,
            denominator_sum_squares=s.syy,
            cross_sum=s.sxy,
            mean=float(data.raw.mean[i]),
            variance=_finite(float(data.raw.var[i])),
            adjusted_mean=float(data.used.mean[i]),
            units_with_covariate=s.n_y if data.spec.kind != experiment_pb2.METRIC_KIND_RATIO else 0,
        )
        for i, (name, s) in enumerate(zip(names, data.stats, strict=True))
    ]


def _comparison(
    data: MetricData, name: str, control: int, treatment: int, settings: Significance
) -> results_pb2.Comparison:
    rho_squared = tuned_rho_squared(settings.alpha, 2 * settings.planned_units_per_arm)
    c = contrast(
        take(data.used, control), take(data.used, treatment), data.method, settings.alpha, rho_squared, data.sign
    )
    comparison = results_pb2.Comparison(
        arm_name=name,
        absolute_effect=float(c.fixed.effect),
        relative_lift=float(c.fixed.lift),
        p_value=float(c.fixed.p_value),
        interval=results_pb2.Interval(lower=float(c.interval[0]), upper=float(c.interval[1])),
        sequential_p_value=float(c.sequential_p_value),
        sequential_interval=results_pb2.Interval(
            lower=float(c.sequential_interval[0]), upper=float(c.sequential_interval[1])
        ),
        significant=bool(excludes_zero(c.interval if settings.fixed_horizon else c.sequential_interval)),
        cuped_applied=data.adjusted is not None,
        variance_reduction=float(variance_reduction(data.adjusted, control, treatment)) if data.adjusted else 0.0,
        probability_to_beat_control=float(c.probability_to_beat_control),
    )
    if data.spec.role in GUARDING_ROLES:
        _, worst, _ = improvement_bounds(data.spec.direction, comparison, settings.fixed_horizon)
        comparison.non_inferior = worst > -margin_of(data.spec)
    return comparison


def _power(data: MetricData, control: int, treatments: Sequence[int], settings: Significance) -> results_pb2.PowerPlan:
    spec = data.spec
    mde = spec.minimum_detectable_effect or (margin_of(spec) if spec.role in GUARDING_ROLES else 0.0)
    n_treatment = min((float(data.used.n[t]) for t in treatments), default=0.0)
    plan = power.plan(
        settings.alpha,
        settings.power,
        mde,
        float(data.raw.mean[control]),
        float(data.used.var[control]),
        spec.kind == experiment_pb2.METRIC_KIND_PROPORTION and data.adjusted is None,
        float(data.used.n[control]),
        n_treatment,
        data.sign,
    )
    return results_pb2.PowerPlan(
        minimum_detectable_effect=plan.minimum_detectable_effect,
        required_units_per_arm=plan.required_units_per_arm,
        achieved_power=plan.achieved_power,
    )


def probability_best(used: Moments, sign: float, seed: int) -> list[float]:
    """P(arm is best) under independent normal posteriors N(mean, var/n); uniform while an arm has no estimate."""
    k = used.mean.shape[-1]
    sd = np.sqrt(used.var_of_mean)
    if not np.all(np.isfinite(sd)):
        return [1.0 / k] * k
    if not np.any(sd > 0):
        top = (used.mean * sign == np.max(used.mean * sign)).astype(float)
        return list(top / top.sum())
    if k == 2:
        first = float(probability_better(used.mean[0] - used.mean[1], np.hypot(sd[0], sd[1]), sign))
        return [first, 1.0 - first]
    draws = np.random.default_rng(seed).normal(used.mean, sd, size=(BEST_ARM_DRAWS, k)) * sign
    return list(np.bincount(draws.argmax(axis=1), minlength=k) / BEST_ARM_DRAWS)


def phase_weights(experiment: experiment_pb2.Experiment, phase: int) -> tuple[float, ...]:
    """The weights a phase started with; the arms' weights when the phase is not recorded."""
    for p in experiment.phases:
        if p.number == phase and p.weights:
            return tuple(p.weights)
    return tuple(a.weight for a in experiment.arms)


def _ordered(experiment: experiment_pb2.Experiment, arms: Sequence[ArmData]) -> list[ArmData]:
    by_name = {a.name: a for a in arms}
    names = [a.name for a in experiment.arms]
    unknown = sorted(set(by_name) - set(names))
    if unknown:
        raise ValueError(f"arms: {unknown} are not arms of experiment {experiment.key!r} (arms: {names})")
    return [by_name.get(name, ArmData(name)) for name in names]


def _bandit_best(
    experiment: experiment_pb2.Experiment, phase: int, ordered: Sequence[ArmData], allocation: int
) -> list[float] | None:
    """A bandit's P(arm is best) from the posterior its re-weighting draws from (Beta or Gaussian arms; seeded by the
    allocation in force), so the results show what the weights come from; None for an A/B test."""
    if experiment.type != experiment_pb2.EXPERIMENT_TYPE_BANDIT or not experiment.metrics:
        return None
    name = experiment.bandit.reward_metric or experiment.metrics[0].name
    spec = next((m for m in experiment.metrics if m.name == name), None)
    if spec is None or spec.kind == experiment_pb2.METRIC_KIND_RATIO:
        return None
    rewards = []
    for arm in ordered:
        stats = arm.metrics.get(name, SufficientStats()).with_units(arm.units)
        rewards.append(bandit.ArmReward(arm.name, stats.n, stats.sx, stats.sxx))
    min_share, min_units = bandit.limits(experiment.bandit)
    seed = bandit.seed_for(experiment.key, phase, allocation)
    try:
        chosen = bandit.thompson(rewards, spec.kind, spec.direction, min_share, min_units, seed)
    except ValueError:  # settings the registry refuses (e.g. a floor too high for the arms): the normal approximation
        return None
    return list(chosen.probability_best)


def control_index(experiment: experiment_pb2.Experiment) -> int:
    """The index of the control arm (the first arm when control_arm is empty)."""
    names = [a.name for a in experiment.arms]
    if not experiment.control_arm:
        return 0
    if experiment.control_arm not in names:
        raise ValueError(f"control_arm {experiment.control_arm!r} is not an arm (arms: {names})")
    return names.index(experiment.control_arm)


def _elapsed(experiment: experiment_pb2.Experiment, running_for_seconds: float, now: datetime) -> float:
    """How long the experiment has run, from its start to its stop (or now)."""
    if not experiment.HasField("started_at"):
        return running_for_seconds
    start = experiment.started_at.ToDatetime(tzinfo=now.tzinfo) if now.tzinfo else experiment.started_at.ToDatetime()
    end = now
    if experiment.HasField("stopped_at"):
        end = experiment.stopped_at.ToDatetime(tzinfo=now.tzinfo) if now.tzinfo else experiment.stopped_at.ToDatetime()
    return max((end - start).total_seconds(), running_for_seconds)


def analyse(
    experiment: experiment_pb2.Experiment,
    phase: int,
    arms: Sequence[ArmData],
    running_for_seconds: float,
    now: datetime,
    *,
    weights_by_allocation: Mapping[int, Sequence[float]] | None = None,
) -> results_pb2.ExperimentResults:
    """Analyse one phase; weights_by_allocation defaults to {0: the phase's weights} (an A/B test)."""
    settings = Significance.of(experiment)
    ordered = _ordered(experiment, arms)
    names = [a.name for a in ordered]
    control = control_index(experiment)
    treatments = [i for i in range(len(names)) if i != control]
    weights = dict(weights_by_allocation) if weights_by_allocation else {0: phase_weights(experiment, phase)}
    current = weights[max(weights)]
    total_weight = sum(current) or 1.0
    results = results_pb2.ExperimentResults(
        experiment_key=experiment.key,
        experiment_version=experiment.version,
        phase=phase,
        control_arm=names[control],
        running_for_seconds=running_for_seconds,
    )
    results.computed_at.FromDatetime(now)

    data = {}
    for spec in experiment.metrics:
        stats = [a.metrics.get(spec.name, SufficientStats()).with_units(a.units) for a in ordered]
        data[spec.name] = d = metric_data(spec, stats)
        results.metrics.append(
            results_pb2.MetricResult(
                metric_name=spec.name,
                role=spec.role,
                kind=spec.kind,
                direction=spec.direction,
                arms=_summaries(d, names),
                comparisons=[_comparison(d, names[t], control, t, settings) for t in treatments],
                power=_power(d, control, treatments, settings),
            )
        )

    best = [1.0 / len(names)] * len(names)
    bandit_best = _bandit_best(experiment, phase, ordered, max(weights))
    chosen = next(
        (data[m.name] for m in experiment.metrics if m.role in SUCCESS_ROLES), next(iter(data.values()), None)
    )
    if bandit_best is not None:
        best = bandit_best
    elif chosen is not None:
        best = probability_best(chosen.used, chosen.sign, zlib.crc32(f"{experiment.key}/{phase}".encode()))
    for i, (arm, spec_arm) in enumerate(zip(ordered, experiment.arms, strict=True)):
        results.arms.append(
            results_pb2.ArmResult(
                arm_name=arm.name,
                units=arm.units,
                weight=current[i] / total_weight if i < len(current) else 0.0,
                model_version=spec_arm.model_version,
                probability_best=best[i],
            )
        )

    expected = srm.expected_units([a.units_by_allocation for a in ordered], weights)
    check = srm.sample_ratio([a.units for a in ordered], expected, settings.srm_p_value, settings.srm_min_deviation)
    results.sample_ratio.CopyFrom(
        results_pb2.SampleRatioCheck(
            chi_square=check.chi_square,
            p_value=check.p_value,
            max_relative_deviation=check.max_relative_deviation,
            mismatch=check.mismatch,
            arms=[
                results_pb2.ArmCount(arm_name=name, expected_units=e, observed_units=o)
                for name, e, o in zip(names, check.expected, check.observed, strict=True)
            ],
        )
    )
    results.decision.CopyFrom(decide(experiment, results, _elapsed(experiment, running_for_seconds, now)))
    return results


def compare_point(
    experiment: experiment_pb2.Experiment,
    metric_name: str,
    control: SufficientStats,
    treatment: SufficientStats,
    *,
    units: tuple[int, int] = (0, 0),
) -> tuple[float, float, float]:
    """(relative lift, sequential lower, sequential upper) of treatment against control, for the results history.

    `units` are the arms' exposed units when the statistics leave out units without outcomes (as in analyse)."""
    spec = next((m for m in experiment.metrics if m.name == metric_name), None)
    if spec is None:
        raise ValueError(f"metric_name {metric_name!r} is not a metric of experiment {experiment.key!r}")
    settings = Significance.of(experiment)
    d = metric_data(spec, [control.with_units(units[0]), treatment.with_units(units[1])])
    rho_squared = tuned_rho_squared(settings.alpha, 2 * settings.planned_units_per_arm)
    c = contrast(take(d.used, 0), take(d.used, 1), d.method, settings.alpha, rho_squared, d.sign, d.binary)
    return float(c.fixed.lift), float(c.sequential_interval[0]), float(c.sequential_interval[1])
