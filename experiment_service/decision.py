"""The decision rule, evaluated per treatment arm into checks kept as data, and the recommended action.

SHIP_TREATMENT when a treatment passes every criterion (the best by the first SUCCESS metric's lift if several);
KEEP_CONTROL when every treatment failed a criterion conclusively (more data cannot make it pass), or when the
maximum duration is reached without a ship; otherwise CONTINUE. Nothing but CONTINUE (or KEEP_CONTROL at the
maximum duration) before every arm has min_units_per_arm units or while the sample ratio is mismatched.
"""

from __future__ import annotations

from collections.abc import Sequence

from experiment_service.significance import Significance
from fresco.api.experiments.v1 import experiment_pb2, results_pb2

# The non-inferiority margin of a LATENCY or GUARDRAIL metric that sets none: "regression under 10%".
DEFAULT_MARGIN = 0.10

Action = experiment_pb2.DecisionAction
Kind = experiment_pb2.CriterionKind


def margin_of(metric: experiment_pb2.MetricSpec) -> float:
    """The metric's non-inferiority margin, DEFAULT_MARGIN when unset."""
    return metric.non_inferiority_margin if metric.non_inferiority_margin > 0 else DEFAULT_MARGIN


def rule_of(experiment: experiment_pb2.Experiment) -> list[experiment_pb2.Criterion]:
    """The explicit criteria, or the default template (see DecisionRule in experiment.proto)."""
    if experiment.decision_rule.criteria:
        return list(experiment.decision_rule.criteria)
    criteria = []
    for metric in experiment.metrics:
        if metric.role in (experiment_pb2.METRIC_ROLE_SUCCESS, experiment_pb2.METRIC_ROLE_UNSPECIFIED):
            kind, threshold = experiment_pb2.CRITERION_KIND_MIN_LIFT, metric.minimum_detectable_effect
        else:
            kind, threshold = experiment_pb2.CRITERION_KIND_MAX_REGRESSION, margin_of(metric)
        criteria.append(experiment_pb2.Criterion(kind=kind, metric=metric.name, threshold=threshold))
    criteria.append(experiment_pb2.Criterion(kind=experiment_pb2.CRITERION_KIND_MIN_UNITS))
    criteria.append(experiment_pb2.Criterion(kind=experiment_pb2.CRITERION_KIND_NO_SAMPLE_RATIO_MISMATCH))
    return criteria


def improvement_bounds(direction: int, comparison: results_pb2.Comparison, fixed: bool) -> tuple[float, float, float]:
    """(point, worst, best) relative improvement: the lift turned so that positive is better, with its interval."""
    interval = comparison.interval if fixed else comparison.sequential_interval
    if direction == experiment_pb2.METRIC_DIRECTION_DECREASE:
        return -comparison.relative_lift, -interval.upper, -interval.lower
    return comparison.relative_lift, interval.lower, interval.upper


def _check(
    experiment: experiment_pb2.Experiment,
    results: results_pb2.ExperimentResults,
    arm: str,
    criterion: experiment_pb2.Criterion,
) -> results_pb2.DecisionCheck:
    check = results_pb2.DecisionCheck(arm_name=arm, criterion=criterion)
    fixed = experiment.statistics.fixed_horizon
    if criterion.kind == experiment_pb2.CRITERION_KIND_MIN_UNITS:
        threshold = criterion.threshold or float(experiment.min_units_per_arm)
        value = float(min((a.units for a in results.arms), default=0))
        check.value, check.threshold, check.passed = value, threshold, value >= threshold
        check.detail = f"fewest units in an arm {value:.0f}, need {threshold:.0f}"
        return check
    if criterion.kind == experiment_pb2.CRITERION_KIND_NO_SAMPLE_RATIO_MISMATCH:
        srm = results.sample_ratio
        threshold = criterion.threshold or Significance.of(experiment).srm_p_value
        check.value, check.threshold, check.passed = srm.p_value, threshold, not srm.mismatch
        check.detail = (
            f"sample ratio χ²={srm.chi_square:.2f}, p={srm.p_value:.3g}, "
            f"largest deviation {srm.max_relative_deviation:.1%}: {'mismatch' if srm.mismatch else 'as configured'}"
        )
        return check
    metric = next((m for m in results.metrics if m.metric_name == criterion.metric), None)
    comparison = next((c for c in metric.comparisons if c.arm_name == arm), None) if metric else None
    check.threshold = criterion.threshold
    if metric is None or comparison is None:
        check.detail = f"criterion names metric {criterion.metric!r}, which the experiment does not measure"
        return check
    point, worst, best = improvement_bounds(metric.direction, comparison, fixed)
    which = "fixed-horizon" if fixed else "always-valid"
    if criterion.kind == experiment_pb2.CRITERION_KIND_MIN_LIFT:
        significant = worst > 0
        check.value, check.passed = point, significant and point >= criterion.threshold
        # Futility: even the best plausible improvement misses the threshold (or the metric is significantly worse).
        check.conclusive = not check.passed and best < criterion.threshold
        check.detail = (
            f"{metric.metric_name} improvement {point:+.2%}, {which} interval [{worst:+.2%}, {best:+.2%}], "
            f"need significant and ≥ {criterion.threshold:+.2%}"
        )
    elif criterion.kind == experiment_pb2.CRITERION_KIND_MAX_REGRESSION:
        check.value, check.passed = -worst, -worst < criterion.threshold
        check.conclusive = not check.passed and -best > criterion.threshold
        check.detail = (
            f"{metric.metric_name} worst plausible regression {-worst:+.2%} ({which}), "
            f"must stay under {criterion.threshold:.2%}"
        )
    else:
        check.detail = f"unknown criterion kind {criterion.kind}"
    return check


def _best(arms: Sequence[str], experiment: experiment_pb2.Experiment, results: results_pb2.ExperimentResults) -> str:
    """The arm with the largest improvement on the first SUCCESS metric (the first arm when there is none)."""
    roles = (experiment_pb2.METRIC_ROLE_SUCCESS, experiment_pb2.METRIC_ROLE_UNSPECIFIED)
    success = next((m for m in results.metrics if m.role in roles), None)
    if success is None:
        return arms[0]
    fixed = experiment.statistics.fixed_horizon
    lifts = {c.arm_name: improvement_bounds(success.direction, c, fixed)[0] for c in success.comparisons}
    return max(arms, key=lambda arm: lifts.get(arm, float("-inf")))


def decide(
    experiment: experiment_pb2.Experiment, results: results_pb2.ExperimentResults, elapsed_seconds: float
) -> results_pb2.Decision:
    """Evaluate the rule for every treatment arm of `results` (metrics, arms and sample ratio filled in)."""
    criteria = rule_of(experiment)
    treatments = [a.arm_name for a in results.arms if a.arm_name != results.control_arm]
    decision = results_pb2.Decision()
    for arm in treatments:
        decision.checks.extend(_check(experiment, results, arm, c) for c in criteria)
    passing = [arm for arm in treatments if all(c.passed for c in decision.checks if c.arm_name == arm)]
    failed = [arm for arm in treatments if any(c.conclusive for c in decision.checks if c.arm_name == arm)]
    fewest = min((a.units for a in results.arms), default=0)
    limit = experiment.max_duration.ToTimedelta().total_seconds() if experiment.HasField("max_duration") else 0.0
    at_limit = limit > 0 and elapsed_seconds >= limit
    if fewest < experiment.min_units_per_arm:
        waiting = f"waiting for {experiment.min_units_per_arm} units in every arm (fewest {fewest})"
    elif results.sample_ratio.mismatch:
        waiting = "sample-ratio mismatch: the split is not what the weights say, so nothing ships"
    else:
        waiting = ""
    if not waiting and passing:
        decision.action, decision.arm = Action.DECISION_ACTION_SHIP_TREATMENT, _best(passing, experiment, results)
        decision.reason = f"{decision.arm} passed every criterion"
    elif not waiting and treatments and len(failed) == len(treatments):
        decision.action = Action.DECISION_ACTION_KEEP_CONTROL
        first = {arm: next(c for c in decision.checks if c.arm_name == arm and c.conclusive) for arm in failed}
        named = ", ".join(f"{arm}: {c.criterion.metric or Kind.Name(c.criterion.kind)}" for arm, c in first.items())
        decision.reason = f"every treatment failed a criterion conclusively ({named})"
    elif at_limit:
        decision.action = Action.DECISION_ACTION_KEEP_CONTROL
        why = waiting or "none passed every criterion"
        decision.reason = f"maximum duration reached with no treatment shipped ({why})"
    else:
        decision.action = Action.DECISION_ACTION_CONTINUE
        decision.reason = waiting or "no treatment has passed every criterion or failed one conclusively yet"
    return decision
