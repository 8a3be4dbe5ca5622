"""What makes an experiment valid: every problem found, each naming its field and what was expected."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Final

from chassis.errors import InvalidArgument
from experiment_service.bandit import limits
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.experiments.assignment import BUCKETS
from fresco.experiments.targeting import problems as targeting_problems

KEY: Final = re.compile(r"[a-z0-9][a-z0-9_.-]*")
MAX_KEY: Final = 128
MAX_NAME: Final = 256
_BANDIT_KINDS: Final = {xpb.METRIC_KIND_UNSPECIFIED, xpb.METRIC_KIND_PROPORTION, xpb.METRIC_KIND_MEAN}
_METRIC_CRITERIA: Final = {xpb.CRITERION_KIND_MIN_LIFT, xpb.CRITERION_KIND_MAX_REGRESSION}


def check_key(key: str, field: str = "key") -> str:
    """`key` when it is a well-formed experiment key; INVALID_ARGUMENT naming `field` otherwise."""
    if not key:
        raise InvalidArgument(f"{field}: expected an experiment key, got an empty string")
    if len(key) > MAX_KEY or not KEY.fullmatch(key):
        raise InvalidArgument(
            f"{field}: expected [a-z0-9][a-z0-9_.-]* of at most {MAX_KEY} characters, got {key[:80]!r}"
        )
    return key


def validate(experiment: xpb.Experiment) -> None:
    """INVALID_ARGUMENT listing every problem of `experiment`'s configuration; nothing when it is valid."""
    found = list(problems(experiment))
    if found:
        raise InvalidArgument("; ".join(found))


def problems(e: xpb.Experiment) -> Iterator[str]:
    """Every problem of the configuration, one message each naming the field."""
    try:
        check_key(e.key)
    except InvalidArgument as err:
        yield str(err)
    if e.type not in xpb.ExperimentType.values():
        yield f"type: expected AB_TEST or BANDIT, got {e.type}"
    if not e.unit_type:
        yield 'unit_type: expected the kind of id units are randomised by (e.g. "user_id"), got an empty string'
    for name in ("owner", "model_name", "unit_type", "salt", "control_arm"):
        if len(getattr(e, name)) > MAX_NAME:
            yield f"{name}: expected at most {MAX_NAME} characters"
    yield from _arms(e)
    if not (math.isfinite(e.coverage) and 0 < e.coverage <= 1):
        yield f"coverage: expected a share in (0, 1], got {e.coverage}"
    if e.HasField("namespace"):
        yield from _namespace(e.namespace)
    yield from targeting_problems(e.targeting)
    yield from _metrics(e)
    if e.min_units_per_arm < 0:
        yield f"min_units_per_arm: expected a count ≥ 0, got {e.min_units_per_arm}"
    if e.max_duration.seconds < 0 or e.max_duration.nanos < 0:
        yield "max_duration: expected a duration ≥ 0"
    yield from _rule(e)
    yield from _statistics(e.statistics)
    if e.type == xpb.EXPERIMENT_TYPE_BANDIT:
        yield from _bandit(e)


def _finite_at_least_zero(value: float) -> bool:
    return math.isfinite(value) and value >= 0


def _arms(e: xpb.Experiment) -> Iterator[str]:
    if len(e.arms) < 2:
        yield f"arms: expected at least two arms, got {len(e.arms)}"
    seen: set[str] = set()
    for i, arm in enumerate(e.arms):
        if not arm.name:
            yield f"arms[{i}].name: expected a name, got an empty string"
        elif len(arm.name) > MAX_NAME:
            yield f"arms[{i}].name: expected at most {MAX_NAME} characters"
        elif arm.name in seen:
            yield f"arms[{i}].name: expected names unique within the experiment, {arm.name!r} is repeated"
        seen.add(arm.name)
        if not _finite_at_least_zero(arm.weight):
            yield f"arms[{i}].weight: expected a non-negative finite weight, got {arm.weight}"
        if arm.model_version < 0:
            yield f"arms[{i}].model_version: expected a version ≥ 1 (or 0 for parameters only), got {arm.model_version}"
        elif arm.model_version and not e.model_name:
            yield f"arms[{i}].model_version: names a version of no model; set model_name"
    weights = [a.weight for a in e.arms]
    if e.arms and all(_finite_at_least_zero(w) for w in weights) and not sum(weights) > 0:
        yield f"arms: weights must sum to a positive total, got {sum(weights)}"
    if e.control_arm and e.control_arm not in seen:
        yield f"control_arm: expected one of the arms' names, got {e.control_arm[:80]!r}"


def _namespace(ns: xpb.Namespace) -> Iterator[str]:
    if not ns.id:
        if ns.start or ns.end:
            yield "namespace.id: expected the namespace's id with its slice, got an empty string"
        return
    if len(ns.id) > MAX_NAME:
        yield f"namespace.id: expected at most {MAX_NAME} characters"
    if not 0 <= ns.start < BUCKETS:
        yield f"namespace.start: expected a bucket in [0, {BUCKETS}), got {ns.start}"
    if not ns.start < ns.end <= BUCKETS:
        yield f"namespace.end: expected a bucket in (start, {BUCKETS}], got {ns.end}"


def _metrics(e: xpb.Experiment) -> Iterator[str]:
    names: set[str] = set()
    for i, m in enumerate(e.metrics):
        here = f"metrics[{i}]"
        if not m.name:
            yield f"{here}.name: expected a name, got an empty string"
        elif m.name in names:
            yield f"{here}.name: expected names unique within the experiment, {m.name!r} is repeated"
        names.add(m.name)
        if m.role not in xpb.MetricRole.values():
            yield f"{here}.role: expected SUCCESS, GUARDRAIL or LATENCY, got {m.role}"
        if m.kind not in xpb.MetricKind.values():
            yield f"{here}.kind: expected PROPORTION, MEAN or RATIO, got {m.kind}"
        if m.direction not in xpb.MetricDirection.values():
            yield f"{here}.direction: expected INCREASE or DECREASE, got {m.direction}"
        if m.kind == xpb.METRIC_KIND_RATIO:
            if not m.denominator_event:
                yield f"{here}.denominator_event: expected the denominator event of a RATIO metric"
            if m.HasField("cuped"):
                yield f"{here}.cuped: CUPED applies to PROPORTION and MEAN metrics, not RATIO"
        for name in ("minimum_detectable_effect", "non_inferiority_margin", "cap"):
            value = getattr(m, name)
            if not _finite_at_least_zero(value):
                yield f"{here}.{name}: expected a finite value ≥ 0, got {value}"
        window = m.cuped.pre_exposure_window
        if window.seconds < 0 or window.nanos < 0:
            yield f"{here}.cuped.pre_exposure_window: expected a duration ≥ 0"


def _rule(e: xpb.Experiment) -> Iterator[str]:
    names = {m.name for m in e.metrics}
    for i, c in enumerate(e.decision_rule.criteria):
        here = f"decision_rule.criteria[{i}]"
        if c.kind not in xpb.CriterionKind.values() or c.kind == xpb.CRITERION_KIND_UNSPECIFIED:
            yield f"{here}.kind: expected MIN_LIFT, MAX_REGRESSION, MIN_UNITS or NO_SAMPLE_RATIO_MISMATCH, got {c.kind}"
        if c.kind in _METRIC_CRITERIA and c.metric not in names:
            yield f"{here}.metric: expected one of the experiment's metrics, got {c.metric[:80]!r}"
        if not _finite_at_least_zero(c.threshold):
            yield f"{here}.threshold: expected a finite value ≥ 0, got {c.threshold}"


def _statistics(s: xpb.StatisticsSettings) -> Iterator[str]:
    for name in ("alpha", "power"):
        value = getattr(s, name)
        if value != 0 and not (math.isfinite(value) and 0 < value < 1):
            yield f"statistics.{name}: expected a probability in (0, 1) (0 for the default), got {value}"
    if s.srm_p_value != 0 and not (math.isfinite(s.srm_p_value) and 0 < s.srm_p_value < 1):
        yield f"statistics.srm_p_value: expected a probability in (0, 1) (0 for the default), got {s.srm_p_value}"
    if not _finite_at_least_zero(s.srm_min_deviation):
        yield f"statistics.srm_min_deviation: expected a finite value ≥ 0, got {s.srm_min_deviation}"


def reward_metric(e: xpb.Experiment) -> xpb.MetricSpec | None:
    """The metric a bandit maximises: the one named, else the first; None when there is none."""
    name = e.bandit.reward_metric
    if not name:
        return e.metrics[0] if e.metrics else None
    return next((m for m in e.metrics if m.name == name), None)


def _bandit(e: xpb.Experiment) -> Iterator[str]:
    b = e.bandit
    metric = reward_metric(e)
    if metric is None:
        got = repr(b.reward_metric[:80]) if b.reward_metric else "no metrics"
        yield f"bandit.reward_metric: expected one of the experiment's metrics, got {got}"
    elif metric.kind not in _BANDIT_KINDS:
        yield f"bandit.reward_metric: expected a PROPORTION or MEAN metric, {metric.name!r} is RATIO"
    share = b.min_arm_share
    if not (math.isfinite(share) and 0 <= share < 1):
        yield f"bandit.min_arm_share: expected a share in [0, 1), got {share}"
    elif e.arms and (floor := limits(b)[0]) * len(e.arms) > 1:
        yield f"bandit.min_arm_share: {floor} for each of {len(e.arms)} arms exceeds the whole (at most 1)"
    if b.min_units_per_arm < 0:
        yield f"bandit.min_units_per_arm: expected a count ≥ 0, got {b.min_units_per_arm}"
    if b.update_interval.seconds < 0 or b.update_interval.nanos < 0:
        yield "bandit.update_interval: expected a duration ≥ 0"
