"""Experiment files: a full file maps onto the contract's Experiment, the Michelangelo template fills what a file leaves
out, and every problem is reported with its YAML path, all of them at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fresco.api.common.v1 import values_pb2
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.experiments_file import ExperimentFileError, default_rule, load, parse

REPOSITORY = Path(__file__).resolve().parents[2]

FULL = """
key: ranker.v2-vs-v1
hypothesis: v2 ranks better
owner: search
type: bandit
model: ranker
arms:
  - {name: base, version: 1, weight: 2, description: serving}
  - {name: wide, version: 2, weight: 1, parameters: {depth: 8, mode: fast}}
  - {name: deep, version: 3, weight: 1}
control: base
unit_type: user_id
coverage: 0.25
salt: s1
targeting:
  - {attribute: country, op: in, values: [FR, DE]}
  - {attribute: age, op: ">=", values: 18}
  - {attribute: beta, op: equals, values: [true]}
  - {attribute: score, op: less_than, values: [0.5]}
  - {attribute: vip, op: exists}
namespace: {id: ranking, start: 100, end: 5100}
metrics:
  - name: ctr
    description: clicks per view
    role: success
    kind: ratio
    direction: increase
    event: click
    denominator: view
    mde: 0.03
    cuped: {covariate: click, window: 7d}
    cap: 50
  - {name: latency_ms, role: latency, kind: mean, direction: decrease, margin: 0.1}
  - {name: errors, role: guardrail, kind: proportion, direction: decrease, margin: 0.05}
min_units_per_arm: 500
max_duration: 14d
decision_rule:
  - {kind: min_lift, metric: ctr, threshold: 0.03}
  - {kind: max_regression, metric: latency_ms, threshold: 0.1}
  - {kind: min_units, threshold: 1000}
  - {kind: no_sample_ratio_mismatch}
statistics: {alpha: 0.01, power: 0.9, fixed_horizon: true, srm_p_value: 0.0005, srm_min_deviation: 0.02}
bandit: {reward: ctr, update_interval: 30s, min_share: 0.1, min_units: 200}
labels: {team: search, tier: 1}
"""


def parsed(text: str, template: str | None = None) -> xpb.Experiment:
    return parse(yaml.safe_load(text), template=template)


def problems_of(text: str, template: str | None = None) -> list[str]:
    with pytest.raises(ExperimentFileError) as caught:
        parsed(text, template)
    return caught.value.problems


def test_a_full_file_maps_onto_the_contract() -> None:
    e = parsed(FULL)
    assert (e.key, e.hypothesis, e.owner, e.type, e.model_name) == (
        "ranker.v2-vs-v1", "v2 ranks better", "search", xpb.EXPERIMENT_TYPE_BANDIT, "ranker",
    )  # fmt: skip
    assert [(a.name, a.model_version, a.weight) for a in e.arms] == [
        ("base", 1, 2.0),
        ("wide", 2, 1.0),
        ("deep", 3, 1.0),
    ]
    assert e.arms[0].description == "serving"
    assert dict(e.arms[1].parameters) == {"depth": "8", "mode": "fast"}
    assert (e.control_arm, e.unit_type, e.coverage, e.salt) == ("base", "user_id", 0.25, "s1")
    conditions = [(c.attribute, c.operator, list(c.values)) for c in e.targeting]
    assert conditions == [
        (
            "country",
            xpb.CONDITION_OPERATOR_IN,
            [values_pb2.Value(string_value="FR"), values_pb2.Value(string_value="DE")],
        ),
        ("age", xpb.CONDITION_OPERATOR_GREATER_OR_EQUAL, [values_pb2.Value(int64_value=18)]),
        ("beta", xpb.CONDITION_OPERATOR_EQUALS, [values_pb2.Value(bool_value=True)]),
        ("score", xpb.CONDITION_OPERATOR_LESS_THAN, [values_pb2.Value(double_value=0.5)]),
        ("vip", xpb.CONDITION_OPERATOR_EXISTS, []),
    ]
    assert e.namespace == xpb.Namespace(id="ranking", start=100, end=5100)
    ctr = e.metrics[0]
    assert (ctr.name, ctr.description, ctr.role, ctr.kind, ctr.direction) == (
        "ctr", "clicks per view", xpb.METRIC_ROLE_SUCCESS, xpb.METRIC_KIND_RATIO, xpb.METRIC_DIRECTION_INCREASE,
    )  # fmt: skip
    assert (ctr.event, ctr.denominator_event, ctr.minimum_detectable_effect, ctr.cap) == ("click", "view", 0.03, 50.0)
    assert (ctr.cuped.covariate_event, ctr.cuped.pre_exposure_window.seconds) == ("click", 7 * 86400)
    latency, errors = e.metrics[1], e.metrics[2]
    assert (latency.role, latency.direction, latency.non_inferiority_margin) == (
        xpb.METRIC_ROLE_LATENCY, xpb.METRIC_DIRECTION_DECREASE, 0.1,
    )  # fmt: skip
    assert (errors.role, errors.kind, errors.non_inferiority_margin) == (
        xpb.METRIC_ROLE_GUARDRAIL, xpb.METRIC_KIND_PROPORTION, 0.05,
    )  # fmt: skip
    assert not latency.HasField("cuped")
    assert e.min_units_per_arm == 500
    assert e.max_duration.seconds == 14 * 86400
    assert list(e.decision_rule.criteria) == [
        xpb.Criterion(kind=xpb.CRITERION_KIND_MIN_LIFT, metric="ctr", threshold=0.03),
        xpb.Criterion(kind=xpb.CRITERION_KIND_MAX_REGRESSION, metric="latency_ms", threshold=0.1),
        xpb.Criterion(kind=xpb.CRITERION_KIND_MIN_UNITS, threshold=1000),
        xpb.Criterion(kind=xpb.CRITERION_KIND_NO_SAMPLE_RATIO_MISMATCH),
    ]
    assert e.statistics == xpb.StatisticsSettings(
        alpha=0.01, power=0.9, fixed_horizon=True, srm_p_value=0.0005, srm_min_deviation=0.02
    )
    assert (e.bandit.reward_metric, e.bandit.update_interval.seconds, e.bandit.min_arm_share) == ("ctr", 30, 0.1)
    assert e.bandit.min_units_per_arm == 200
    assert dict(e.labels) == {"team": "search", "tier": "1"}
    # Fields the service sets stay unset.
    assert (e.status, e.version, list(e.phases)) == (xpb.EXPERIMENT_STATUS_UNSPECIFIED, 0, [])


MINIMAL = """
key: small
model: m
unit_type: user_id
arms: [{name: a, version: 1}, {name: b, version: 2}]
"""


def test_a_minimal_file_splits_equally_with_full_coverage_and_leaves_the_rest_to_the_service() -> None:
    e = parsed(MINIMAL)
    assert [a.weight for a in e.arms] == [0.5, 0.5]
    assert (e.type, e.coverage, e.min_units_per_arm) == (xpb.EXPERIMENT_TYPE_AB_TEST, 1.0, 0)
    assert not e.metrics
    assert not e.decision_rule.criteria
    assert [e.HasField(f) for f in ("max_duration", "statistics", "namespace", "bandit")] == [False] * 4


def test_the_michelangelo_template_fills_the_issue_defaults() -> None:
    e = parsed(MINIMAL, template="michelangelo")
    assert [a.weight for a in e.arms] == [0.9, 0.1]
    assert e.min_units_per_arm == 10_000
    assert e.max_duration.seconds == 14 * 86400
    assert (e.statistics.alpha, e.statistics.power) == (0.05, 0.8)
    metrics = [
        (m.name, m.role, m.kind, m.direction, m.minimum_detectable_effect, m.non_inferiority_margin) for m in e.metrics
    ]
    assert metrics == [
        ("accuracy", xpb.METRIC_ROLE_SUCCESS, xpb.METRIC_KIND_PROPORTION, xpb.METRIC_DIRECTION_INCREASE, 0.02, 0.0),
        ("latency_ms", xpb.METRIC_ROLE_LATENCY, xpb.METRIC_KIND_MEAN, xpb.METRIC_DIRECTION_DECREASE, 0.0, 0.1),
        ("business_kpi", xpb.METRIC_ROLE_SUCCESS, xpb.METRIC_KIND_MEAN, xpb.METRIC_DIRECTION_INCREASE, 0.05, 0.0),
    ]
    assert list(e.decision_rule.criteria) == [
        xpb.Criterion(kind=xpb.CRITERION_KIND_MIN_LIFT, metric="accuracy", threshold=0.02),
        xpb.Criterion(kind=xpb.CRITERION_KIND_MAX_REGRESSION, metric="latency_ms", threshold=0.1),
        xpb.Criterion(kind=xpb.CRITERION_KIND_MIN_LIFT, metric="business_kpi", threshold=0.05),
        xpb.Criterion(kind=xpb.CRITERION_KIND_MIN_UNITS),
        xpb.Criterion(kind=xpb.CRITERION_KIND_NO_SAMPLE_RATIO_MISMATCH),
    ]
    # The template key in the file does the same as the flag.
    assert parsed(MINIMAL + "template: michelangelo\n") == e


def test_the_template_keeps_what_the_file_states_and_gives_control_its_90_percent() -> None:
    text = """
key: three
template: michelangelo
model: m
unit_type: user_id
arms: [{name: a, version: 1}, {name: b, version: 2}, {name: c, version: 3}]
control: b
min_units_per_arm: 2000
max_duration: 3d
statistics: {alpha: 0.01}
metrics: [{name: revenue, mde: 0.01}, {name: p99, role: latency, direction: decrease}]
"""
    e = parsed(text)
    assert [a.weight for a in e.arms] == [0.05, 0.9, 0.05]
    assert (e.min_units_per_arm, e.max_duration.seconds) == (2000, 3 * 86400)
    assert (e.statistics.alpha, e.statistics.power) == (0.01, 0.8)
    assert [m.name for m in e.metrics] == ["revenue", "p99"]
    # The rule is derived from the file's metrics; a latency metric without a margin gets the default 10%.
    assert [(c.kind, c.metric, c.threshold) for c in e.decision_rule.criteria[:2]] == [
        (xpb.CRITERION_KIND_MIN_LIFT, "revenue", 0.01),
        (xpb.CRITERION_KIND_MAX_REGRESSION, "p99", 0.1),
    ]
    assert list(e.decision_rule.criteria) == default_rule(e.metrics)
    weighted = parsed(text.replace("{name: a, version: 1}", "{name: a, version: 1, weight: 1}")
                      .replace("{name: b, version: 2}", "{name: b, version: 2, weight: 1}")
                      .replace("{name: c, version: 3}", "{name: c, version: 3, weight: 2}"))  # fmt: skip
    assert [a.weight for a in weighted.arms] == [1.0, 1.0, 2.0]


def test_the_example_file_loads() -> None:
    e = load(REPOSITORY / "examples" / "experiments" / "demo-v2-vs-v1.yaml")
    assert (e.key, e.model_name, [a.model_version for a in e.arms]) == ("demo-v2-vs-v1", "demo", [1, 2])
    assert [a.weight for a in e.arms] == [0.9, 0.1]
    assert [m.name for m in e.metrics] == ["accuracy", "latency_ms", "business_kpi"]
    assert e.min_units_per_arm == 10_000
    assert len(e.decision_rule.criteria) == 5


ADD = "(appended)"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("key: small", "kee: small", "kee: unknown field (did you mean key?)"),
        ("key: small", "key: Small!", "key: expected lower-case letters"),
        ("key: small", "hypothesis: x", "key: required; expected a non-empty string"),
        ("unit_type: user_id", "unit_type: ''", "unit_type: expected a non-empty string"),
        ("unit_type: user_id", "owner: x", "unit_type: required"),
        (ADD, "type: multi", "type: expected one of ab, bandit, got 'multi'"),
        (ADD, "coverage: 1.5", "coverage: expected a number in [0, 1], got 1.5"),
        (ADD, "coverage: 0", "coverage: expected a number in (0, 1], got 0"),
        (ADD, "template: google", "template: expected one of michelangelo, got 'google'"),
        (
            "arms: [{name: a, version: 1}, {name: b, version: 2}]",
            "arms: [{name: a, version: 1}]",
            "arms: expected at least two arms, got 1",
        ),
        (
            "arms: [{name: a, version: 1}, {name: b, version: 2}]",
            "arms: {a: 1}",
            "arms: expected a list, got a mapping",
        ),
        ("{name: b, version: 2}", "{name: a, version: 2}", "arms[1].name: 'a' is declared twice"),
        (
            "{name: b, version: 2}",
            "{name: b, version: 2, wieght: 1}",
            "arms[1].wieght: unknown field (did you mean weight?)",
        ),
        ("{name: b, version: 2}", "{version: 2}", "arms[1].name: required"),
        ("{name: b, version: 2}", "{name: b, version: -2}", "arms[1].version: expected an integer >= 0, got -2"),
        ("{name: b, version: 2}", "{name: b}", "arms[1].version: required with model"),
        (
            "{name: b, version: 2}",
            "{name: b, version: 2, weight: -1}",
            "arms[1].weight: expected a number >= 0, got -1",
        ),
        (
            "{name: b, version: 2}",
            "{name: b, version: 2, weight: 1}",
            "arms[0].weight: required: give every arm a weight",
        ),
        ("{name: a, version: 1}", "{name: a, version: 1, weight: 0}", "arms[1].weight: required: give every arm"),
        ("{name: b, version: 2}", "{name: b, version: 2, parameters: [1]}", "arms[1].parameters: expected a mapping"),
        (ADD, "control: z", "control: expected one of the arms (a, b), got 'z'"),
        ("model: m", "owner: o", "model: required when arms name versions"),
        (
            ADD,
            "targeting: [{attribute: c, op: like, values: [x]}]",
            "targeting[0].op: expected one of equals, exists, greater_or_equal",
        ),
        (ADD, "targeting: [{attribute: c, values: [x]}]", "targeting[0].op: required"),
        (ADD, "targeting: [{op: in, values: [x]}]", "targeting[0].attribute: required"),
        (
            ADD,
            "targeting: [{attribute: c, op: in, values: []}]",
            "targeting[0].values: expected at least one value for CONDITION_OPERATOR_IN",
        ),
        (
            ADD,
            "targeting: [{attribute: c, op: '>', values: [x]}]",
            "targeting[0].values[0]: expected a number for CONDITION_OPERATOR_GREATER_THAN",
        ),
        (
            ADD,
            "targeting: [{attribute: c, op: exists, values: [x]}]",
            "targeting[0].values: expected no values for CONDITION_OPERATOR_EXISTS, got 1",
        ),
        (
            ADD,
            "targeting: [{attribute: c, op: in, values: [[1, 2]]}]",
            "targeting[0].values[0]: expected a string, number or boolean, got list",
        ),
        (ADD, "namespace: {start: 0, end: 10}", "namespace.id: required"),
        (ADD, "namespace: {id: n, start: 0}", "namespace.end: required; expected an integer in (start, 10000]"),
        (
            ADD,
            "namespace: {id: n, start: 500, end: 400}",
            "namespace.end: expected an integer in (500, 10000], got 400",
        ),
        (
            ADD,
            "namespace: {id: n, start: 10000, end: 10000}",
            "namespace.start: expected an integer in [0, 10000), got 10000",
        ),
        (
            ADD,
            "namespace: {id: n, start: 0, end: 10001}",
            "namespace.end: expected an integer in (0, 10000], got 10001",
        ),
        (ADD, "metrics: [{role: success}]", "metrics[0].name: required"),
        (ADD, "metrics: [{name: x}, {name: x}]", "metrics[1].name: 'x' is declared twice"),
        (
            ADD,
            "metrics: [{name: x, role: primary}]",
            "metrics[0].role: expected one of guardrail, latency, success, got 'primary'",
        ),
        (ADD, "metrics: [{name: x, kind: avg}]", "metrics[0].kind: expected one of mean, proportion, ratio, got 'avg'"),
        (
            ADD,
            "metrics: [{name: x, direction: up}]",
            "metrics[0].direction: expected one of decrease, increase, got 'up'",
        ),
        (ADD, "metrics: [{name: x, kind: ratio}]", "metrics[0].denominator: required for kind ratio"),
        (ADD, "metrics: [{name: x, denominator: y}]", "metrics[0].denominator: only for kind ratio"),
        (ADD, "metrics: [{name: x, mde: -0.1}]", "metrics[0].mde: expected a number >= 0, got -0.1"),
        (ADD, "metrics: [{name: x, margin: big}]", "metrics[0].margin: expected a number >= 0, got 'big'"),
        (ADD, "metrics: [{name: x, cap: -1}]", "metrics[0].cap: expected a number >= 0, got -1"),
        (ADD, "metrics: [{name: x, cuped: {window: 2 weeks}}]", "metrics[0].cuped.window: expected a duration"),
        (ADD, "metrics: [{name: x, cuped: {covariates: y}}]", "metrics[0].cuped.covariates: unknown field"),
        (ADD, "min_units_per_arm: -5", "min_units_per_arm: expected an integer >= 0, got -5"),
        (ADD, "max_duration: two weeks", "max_duration: expected a duration such as"),
        (ADD, "decision_rule: [{metric: x}]", "decision_rule[0].kind: required"),
        (
            ADD,
            "decision_rule: [{kind: max_lift, metric: x}]",
            "decision_rule[0].kind: expected one of max_regression, min_lift, min_units, no_sample_ratio_mismatch",
        ),
        (ADD, "decision_rule: [{kind: min_lift}]", "decision_rule[0].metric: required for min_lift"),
        (ADD, "decision_rule: [{kind: min_units, metric: x}]", "decision_rule[0].metric: only for"),
        (
            ADD,
            "decision_rule: [{kind: min_lift, metric: ctr}]",
            "decision_rule[0].metric: expected one of the metrics (none declared), got 'ctr'",
        ),
        (
            ADD,
            "decision_rule: [{kind: min_lift, metric: x, threshold: high}]",
            "decision_rule[0].threshold: expected a number",
        ),
        (ADD, "statistics: {alpha: 0}", "statistics.alpha: expected a number in (0, 1), got 0"),
        (ADD, "statistics: {power: 1.5}", "statistics.power: expected a number in [0, 1], got 1.5"),
        (ADD, "statistics: {srm_p_value: 1}", "statistics.srm_p_value: expected a number in (0, 1), got 1"),
        (ADD, "statistics: {srm_min_deviation: -1}", "statistics.srm_min_deviation: expected a number >= 0"),
        (ADD, "statistics: {fixed_horizon: sometimes}", "statistics.fixed_horizon: expected true or false"),
        (ADD, "statistics: {alfa: 0.1}", "statistics.alfa: unknown field (did you mean alpha?)"),
        (ADD, "bandit: {min_units: 5}", "bandit: only for type: bandit"),
        (
            ADD,
            "type: bandit\nbandit: {reward: ctr}",
            "bandit.reward: expected one of the metrics (none declared), got 'ctr'",
        ),
        (ADD, "type: bandit\nbandit: {min_share: 0.5}", "bandit.min_share: expected a number in [0, 1/2), got 0.5"),
        (ADD, "type: bandit\nbandit: {update_interval: often}", "bandit.update_interval: expected a duration"),
        (ADD, "type: bandit\nbandit: {min_units: 1.5}", "bandit.min_units: expected an integer >= 0, got 1.5"),
        (ADD, "labels: [a]", "labels: expected a mapping of names to strings"),
    ],
)
def test_every_problem_names_its_field(old: str, new: str, expected: str) -> None:
    text = MINIMAL + new + "\n" if old == ADD else MINIMAL.replace(old, new, 1)
    assert text != MINIMAL
    found = problems_of(text)
    assert any(problem.startswith(expected) for problem in found), found


def test_every_problem_is_reported_at_once() -> None:
    text = """
key: Bad Key
unit_type: 3
arms: [{name: a, weight: x}]
coverage: 2
metrics: [{name: m, kind: avg}]
"""
    found = problems_of(text)
    assert [p.split(":")[0] for p in found] == [
        "unit_type", "key", "coverage", "arms[0].weight", "arms", "metrics[0].kind",
    ]  # fmt: skip


def test_a_document_that_is_not_a_mapping_and_an_unknown_template_flag_are_refused() -> None:
    assert problems_of("- a\n- b\n")[0] == "document: expected a mapping, got a list"
    assert "--template: expected one of michelangelo, got 'x'" in problems_of(MINIMAL, template="x")


def test_load_reports_the_file_and_yaml_syntax_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("key: [unclosed\n")
    with pytest.raises(ExperimentFileError) as caught:
        load(bad)
    assert str(caught.value).startswith(f"{bad}: ")
    with pytest.raises(ExperimentFileError, match="No such file"):
        load(tmp_path / "missing.yaml")
