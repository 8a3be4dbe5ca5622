"""Assigning from the slim configuration: the same answers as the frozen specification, every reason a unit is
left out, namespaces that exclude each other, coverage that grows without moving anyone, identical answers in
another process, targeting, bandit arms settled by a sticky store, and the deterministic exposure id."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping

import pytest

from fresco.api.common.v1 import values_pb2
from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.experiments.assignment import Placement
from fresco.experiments.evaluator import Evaluator, config_of
from fresco.experiments.exposure import exposure_id
from fresco.experiments.targeting import matches, problems

UNITS = [f"u{i}" for i in range(5_000)]


def experiment(
    key: str, weights: tuple[float, ...] = (0.5, 0.5), coverage: float = 1.0, **fields: object
) -> xpb.Experiment:
    arms = [xpb.Arm(name=f"arm{i}", weight=w, model_version=i + 1) for i, w in enumerate(weights)]
    return xpb.Experiment(
        key=key,
        model_name="m",
        unit_type="user_id",
        coverage=coverage,
        arms=arms,
        version=3,
        phases=[xpb.Phase(number=2)],
        **fields,  # type: ignore[arg-type]
    )


def evaluator(*experiments: xpb.Experiment) -> Evaluator:
    return Evaluator(apb.AssignmentConfig(revision=7, experiments=[config_of(e) for e in experiments]))


def arms_of(ev: Evaluator, key: str) -> dict[str, str]:
    out = {}
    for unit in UNITS:
        (a,) = ev.assign({"user_id": unit}, {}, keys=[key])
        if a.assigned:
            out[unit] = a.arm_name
    return out


def test_the_evaluator_gives_the_frozen_specifications_arms() -> None:
    e = experiment("exp-a", (0.9, 0.1), coverage=0.6, namespace=xpb.Namespace(id="ns1", start=1000, end=8000))
    ev = evaluator(e)
    placement = Placement("exp-a", (0.9, 0.1), 0.6, "ns1", (1000, 8000))
    for unit in UNITS:
        (a,) = ev.assign({"user_id": unit}, {})
        index = placement.arm(unit)
        assert a.arm_name == ("" if index is None else f"arm{index}")
        assert a.model_version == (0 if index is None else index + 1)
        assert (a.experiment_key, a.experiment_version, a.phase) == ("exp-a", 3, 2)


def test_reasons_for_leaving_a_unit_out() -> None:
    e = experiment(
        "exp-b",
        coverage=0.5,
        targeting=[
            xpb.TargetingCondition(
                attribute="country", operator=xpb.CONDITION_OPERATOR_IN, values=[values_pb2.Value(string_value="NL")]
            )
        ],
    )
    ev = evaluator(e)
    nl = {"country": values_pb2.Value(string_value="NL")}
    assert ev.assign({"session": "s"}, nl)[0].reason == apb.ASSIGNMENT_REASON_MISSING_UNIT_ID
    assert ev.assign({"user_id": "u1"}, {})[0].reason == apb.ASSIGNMENT_REASON_TARGETING_MISMATCH
    reasons = {ev.assign({"user_id": u}, nl)[0].reason for u in UNITS[:200]}
    assert reasons == {apb.ASSIGNMENT_REASON_ASSIGNED, apb.ASSIGNMENT_REASON_OUTSIDE_COVERAGE}
    assert ev.assign({"user_id": "u1"}, nl, model_name="other") == []


def test_namespaces_exclude_each_other() -> None:
    left = experiment("left", namespace=xpb.Namespace(id="checkout", start=0, end=5000))
    right = experiment("right", namespace=xpb.Namespace(id="checkout", start=5000, end=10000))
    ev = evaluator(left, right)
    in_left, in_right = set(arms_of(ev, "left")), set(arms_of(ev, "right"))
    assert not in_left & in_right
    assert len(in_left | in_right) == len(UNITS)  # the two halves cover the namespace
    assert 0.45 < len(in_left) / len(UNITS) < 0.55


def test_growing_coverage_moves_no_one() -> None:
    small = arms_of(evaluator(experiment("grow", coverage=0.2)), "grow")
    large = arms_of(evaluator(experiment("grow", coverage=0.7)), "grow")
    assert small
    assert len(large) > 3 * len(small)
    assert all(large[unit] == arm for unit, arm in small.items())


def test_another_process_assigns_the_same_arms() -> None:
    e = experiment("cross", (0.3, 0.3, 0.4), coverage=0.8)
    here = arms_of(evaluator(e), "cross")
    script = (
        "import json,sys\n"
        "from fresco.api.experiments.v1 import experiment_pb2 as xpb\n"
        "from tests.experiments.test_evaluator import arms_of, evaluator\n"
        "e = xpb.Experiment.FromString(bytes.fromhex(sys.argv[1]))\n"
        "print(json.dumps(arms_of(evaluator(e), 'cross')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, e.SerializeToString().hex()], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == here


@pytest.mark.parametrize(
    ("op", "values", "attribute", "expected"),
    [
        (xpb.CONDITION_OPERATOR_EQUALS, [values_pb2.Value(int64_value=3)], values_pb2.Value(double_value=3.0), True),
        (xpb.CONDITION_OPERATOR_EQUALS, [values_pb2.Value(string_value="3")], values_pb2.Value(int64_value=3), False),
        (xpb.CONDITION_OPERATOR_NOT_EQUALS, [values_pb2.Value(string_value="a")], None, False),
        (xpb.CONDITION_OPERATOR_NOT_IN, [values_pb2.Value(string_value="a")], values_pb2.Value(string_value="b"), True),
        (
            xpb.CONDITION_OPERATOR_GREATER_THAN,
            [values_pb2.Value(int64_value=18)],
            values_pb2.Value(int64_value=21),
            True,
        ),
        (
            xpb.CONDITION_OPERATOR_LESS_OR_EQUAL,
            [values_pb2.Value(int64_value=18)],
            values_pb2.Value(string_value="x"),
            False,
        ),
        (xpb.CONDITION_OPERATOR_EXISTS, [], values_pb2.Value(bool_value=False), True),
        (xpb.CONDITION_OPERATOR_NOT_EXISTS, [], values_pb2.Value(), True),
    ],
)
def test_targeting_operators(
    op: int, values: list[values_pb2.Value], attribute: values_pb2.Value | None, expected: bool
) -> None:
    condition = xpb.TargetingCondition(attribute="a", operator=op, values=values)  # type: ignore[arg-type]
    attributes: Mapping[str, values_pb2.Value] = {"a": attribute} if attribute is not None else {}
    assert not problems([condition])
    assert matches([condition], attributes) is expected


def test_targeting_problems_name_the_field() -> None:
    bad = [
        xpb.TargetingCondition(attribute="", operator=xpb.CONDITION_OPERATOR_EXISTS),
        xpb.TargetingCondition(attribute="age", operator=xpb.CONDITION_OPERATOR_GREATER_THAN),
        xpb.TargetingCondition(
            attribute="age", operator=xpb.CONDITION_OPERATOR_LESS_THAN, values=[values_pb2.Value(string_value="x")]
        ),
        xpb.TargetingCondition(attribute="c"),
    ]
    found = problems(bad)
    assert found[0].startswith("targeting[0].attribute:")
    assert found[1].startswith("targeting[1].values: expected exactly one value")
    assert found[2].startswith("targeting[2].values[0]: expected a number")
    assert found[3].startswith("targeting[3].operator:")


class DictSticky:
    """A store keeping the first proposal per unit, as the Redis and SQLite stores do."""

    def __init__(self) -> None:
        self.kept: dict[tuple[str, int, str, str], tuple[str, int]] = {}

    async def claim(
        self, experiment_key: str, phase: int, unit_type: str, proposals: Mapping[str, tuple[str, int]]
    ) -> dict[str, tuple[str, int]]:
        return {u: self.kept.setdefault((experiment_key, phase, unit_type, u), p) for u, p in proposals.items()}


async def test_bandit_units_keep_their_first_arm_when_weights_change() -> None:
    sticky = DictSticky()
    before = evaluator(experiment("bandit", (0.5, 0.5), type=xpb.EXPERIMENT_TYPE_BANDIT))
    first = await before.settle([before.assign({"user_id": u}, {})[0] for u in UNITS[:500]], sticky)
    assert all(a.sticky for a in first)
    reweighted = apb.ExperimentConfig()
    reweighted.CopyFrom(config_of(experiment("bandit", (0.05, 0.95), type=xpb.EXPERIMENT_TYPE_BANDIT), allocation=4))
    after = Evaluator(apb.AssignmentConfig(revision=8, experiments=[reweighted]))
    raw = [after.assign({"user_id": u}, {})[0] for u in UNITS[:500]]
    assert (
        sum(a.arm_name != b.arm_name for a, b in zip(first, raw, strict=True)) > 100
    )  # the hash alone would move them
    settled = await after.settle(raw, sticky)
    assert [a.arm_name for a in settled] == [a.arm_name for a in first]
    assert {a.allocation for a in settled} == {0}
    newcomers = await after.settle([after.assign({"user_id": u}, {})[0] for u in UNITS[500:1500]], sticky)
    assert {a.allocation for a in newcomers} == {4}
    assert sum(a.arm_name == "arm1" for a in newcomers) > 850


def test_exposure_id_is_the_documented_digest() -> None:
    import hashlib

    expected = hashlib.sha256(b"exp\n2\nuser_id\nu1\ntreatment").hexdigest()[:32]
    assert exposure_id("exp", 2, "user_id", "u1", "treatment") == expected
    assert exposure_id("exp", 3, "user_id", "u1", "treatment") != expected
