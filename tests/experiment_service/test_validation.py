"""Experiment validation: a valid experiment passes; each broken field is named with what was expected."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from chassis.errors import InvalidArgument
from experiment_service.validation import problems, validate
from fresco.api.common.v1 import values_pb2
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from tests.experiment_service.service_support import experiment

Mutation = Callable[[xpb.Experiment], object]


def _bandit(then: Mutation) -> Mutation:
    def mutate(e: xpb.Experiment) -> None:
        e.type = xpb.EXPERIMENT_TYPE_BANDIT
        then(e)

    return mutate


def _zero_weights(e: xpb.Experiment) -> None:
    for arm in e.arms:
        arm.weight = 0.0


def _ratio_first(e: xpb.Experiment) -> None:
    e.metrics[0].CopyFrom(xpb.MetricSpec(name="ctr", kind=xpb.METRIC_KIND_RATIO, denominator_event="v"))


CASES: dict[str, tuple[Mutation, str]] = {
    "bad key": (lambda e: setattr(e, "key", "Bad Key"), "key: expected [a-z0-9][a-z0-9_.-]*"),
    "one arm": (lambda e: e.arms.pop(), "arms: expected at least two arms, got 1"),
    "repeated arm": (lambda e: setattr(e.arms[1], "name", "arm0"), "arms[1].name: expected names unique"),
    "negative weight": (lambda e: setattr(e.arms[1], "weight", -1.0), "arms[1].weight: expected a non-negative"),
    "nan weight": (lambda e: setattr(e.arms[0], "weight", float("nan")), "arms[0].weight"),
    "zero total": (
        _zero_weights,
        "arms: weights must sum to a positive total",
    ),
    "unknown control": (lambda e: setattr(e, "control_arm", "nope"), "control_arm: expected one of the arms"),
    "no coverage": (lambda e: setattr(e, "coverage", 0.0), "coverage: expected a share in (0, 1], got 0.0"),
    "coverage over 1": (lambda e: setattr(e, "coverage", 1.5), "coverage: expected a share in (0, 1]"),
    "no unit type": (lambda e: setattr(e, "unit_type", ""), "unit_type: expected"),
    "namespace range": (
        lambda e: e.namespace.CopyFrom(xpb.Namespace(id="n", start=500, end=400)),
        "namespace.end: expected a bucket in (start, 10000]",
    ),
    "namespace start": (
        lambda e: e.namespace.CopyFrom(xpb.Namespace(id="n", start=-1, end=400)),
        "namespace.start: expected a bucket in [0, 10000)",
    ),
    "targeting": (
        lambda e: e.targeting.add(attribute="country", operator=xpb.CONDITION_OPERATOR_EQUALS),
        "targeting[0].values: expected exactly one value",
    ),
    "targeting number": (
        lambda e: e.targeting.add(
            attribute="age", operator=xpb.CONDITION_OPERATOR_GREATER_THAN, values=[values_pb2.Value(string_value="x")]
        ),
        "targeting[0].values[0]: expected a number",
    ),
    "repeated metric": (lambda e: e.metrics.add(name="conversion"), "metrics[1].name: expected names unique"),
    "metric kind": (lambda e: setattr(e.metrics[0], "kind", 42), "metrics[0].kind: expected PROPORTION"),
    "metric role": (lambda e: setattr(e.metrics[0], "role", 42), "metrics[0].role: expected SUCCESS"),
    "ratio denominator": (
        lambda e: e.metrics.add(name="ctr", kind=xpb.METRIC_KIND_RATIO),
        "metrics[1].denominator_event: expected the denominator event",
    ),
    "cuped ratio": (
        lambda e: e.metrics.add(name="ctr", kind=xpb.METRIC_KIND_RATIO, denominator_event="v", cuped=xpb.Cuped()),
        "metrics[1].cuped: CUPED applies to PROPORTION and MEAN metrics, not RATIO",
    ),
    "negative cap": (lambda e: setattr(e.metrics[0], "cap", -1.0), "metrics[0].cap: expected a finite value ≥ 0"),
    "negative mde": (
        lambda e: setattr(e.metrics[0], "minimum_detectable_effect", -0.1),
        "metrics[0].minimum_detectable_effect",
    ),
    "negative margin": (
        lambda e: setattr(e.metrics[0], "non_inferiority_margin", -0.1),
        "metrics[0].non_inferiority_margin",
    ),
    "version without model": (lambda e: setattr(e, "model_name", ""), "arms[0].model_version: names a version of no"),
    "alpha": (lambda e: setattr(e.statistics, "alpha", 1.0), "statistics.alpha: expected a probability in (0, 1)"),
    "power": (lambda e: setattr(e.statistics, "power", -0.2), "statistics.power: expected a probability in (0, 1)"),
    "criterion metric": (
        lambda e: e.decision_rule.criteria.add(kind=xpb.CRITERION_KIND_MIN_LIFT, metric="nope", threshold=0.02),
        "decision_rule.criteria[0].metric: expected one of the experiment's metrics",
    ),
    "bandit reward": (
        _bandit(lambda e: setattr(e.bandit, "reward_metric", "nope")),
        "bandit.reward_metric: expected one of the experiment's metrics, got 'nope'",
    ),
    "bandit ratio reward": (
        _bandit(_ratio_first),
        "bandit.reward_metric: expected a PROPORTION or MEAN metric",
    ),
    "bandit floor": (
        _bandit(lambda e: setattr(e.bandit, "min_arm_share", 0.6)),
        "bandit.min_arm_share: 0.6 for each of 2 arms exceeds the whole",
    ),
}


def test_a_valid_experiment_has_no_problems() -> None:
    assert list(problems(experiment("exp-ok"))) == []
    assert list(problems(experiment("exp-bandit", (1, 1, 1), kind=xpb.EXPERIMENT_TYPE_BANDIT))) == []


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_problem_names_its_field(case: str) -> None:
    mutate, expected = CASES[case]
    e = experiment("exp-bad")
    mutate(e)
    with pytest.raises(InvalidArgument) as raised:
        validate(e)
    assert expected in str(raised.value)


def test_every_problem_is_reported_at_once() -> None:
    e = experiment("exp-bad", (0.0, 0.0), coverage=2.0)
    found = list(problems(e))
    assert any(p.startswith("arms: weights must sum to a positive total") for p in found)
    assert any(p.startswith("coverage:") for p in found)
