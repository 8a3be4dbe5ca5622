"""Experiment files for `fresco experiments create`: one YAML mapping decoded strictly into an `Experiment`, every
problem reported with its YAML path (e.g. "metrics[1].kind: expected one of mean, proportion, ratio, got 'avg'"),
and the Michelangelo template (`template: michelangelo` or `--template michelangelo`) filling what a file leaves out."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TypeVar

import yaml
from google.protobuf import duration_pb2

from fresco.api.common.v1 import values_pb2
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.client import to_value
from fresco.experiments import targeting
from fresco.yaml_reader import Reader, num

E = TypeVar("E", bound=int)

TOP_FIELDS = (
    "key", "hypothesis", "owner", "template", "type", "model", "arms", "control", "unit_type", "coverage", "salt",
    "targeting", "namespace", "metrics", "min_units_per_arm", "max_duration", "decision_rule", "statistics", "bandit",
    "labels",
)  # fmt: skip
ARM_FIELDS = ("name", "description", "weight", "version", "parameters")
CONDITION_FIELDS = ("attribute", "op", "values")
NAMESPACE_FIELDS = ("id", "start", "end")
METRIC_FIELDS = (
    "name", "description", "role", "kind", "direction", "event", "denominator", "mde", "margin", "cuped", "cap",
)  # fmt: skip
CUPED_FIELDS = ("covariate", "window")
CRITERION_FIELDS = ("kind", "metric", "threshold")
STATISTICS_FIELDS = ("alpha", "power", "fixed_horizon", "srm_p_value", "srm_min_deviation")
BANDIT_FIELDS = ("reward", "update_interval", "min_share", "min_units")
TEMPLATES = ("michelangelo",)
BUCKETS = 10_000
_KEY = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")

TYPES = {"ab": xpb.EXPERIMENT_TYPE_AB_TEST, "bandit": xpb.EXPERIMENT_TYPE_BANDIT}
ROLES = {"success": xpb.METRIC_ROLE_SUCCESS, "guardrail": xpb.METRIC_ROLE_GUARDRAIL, "latency": xpb.METRIC_ROLE_LATENCY}
KINDS = {"proportion": xpb.METRIC_KIND_PROPORTION, "mean": xpb.METRIC_KIND_MEAN, "ratio": xpb.METRIC_KIND_RATIO}
DIRECTIONS = {"increase": xpb.METRIC_DIRECTION_INCREASE, "decrease": xpb.METRIC_DIRECTION_DECREASE}
CRITERIA = {
    "min_lift": xpb.CRITERION_KIND_MIN_LIFT,
    "max_regression": xpb.CRITERION_KIND_MAX_REGRESSION,
    "min_units": xpb.CRITERION_KIND_MIN_UNITS,
    "no_sample_ratio_mismatch": xpb.CRITERION_KIND_NO_SAMPLE_RATIO_MISMATCH,
}
_METRIC_CRITERIA = {xpb.CRITERION_KIND_MIN_LIFT, xpb.CRITERION_KIND_MAX_REGRESSION}
OPERATORS = {
    "equals": xpb.CONDITION_OPERATOR_EQUALS, "==": xpb.CONDITION_OPERATOR_EQUALS,
    "not_equals": xpb.CONDITION_OPERATOR_NOT_EQUALS, "!=": xpb.CONDITION_OPERATOR_NOT_EQUALS,
    "in": xpb.CONDITION_OPERATOR_IN, "not_in": xpb.CONDITION_OPERATOR_NOT_IN,
    "greater_than": xpb.CONDITION_OPERATOR_GREATER_THAN, ">": xpb.CONDITION_OPERATOR_GREATER_THAN,
    "greater_or_equal": xpb.CONDITION_OPERATOR_GREATER_OR_EQUAL, ">=": xpb.CONDITION_OPERATOR_GREATER_OR_EQUAL,
    "less_than": xpb.CONDITION_OPERATOR_LESS_THAN, "<": xpb.CONDITION_OPERATOR_LESS_THAN,
    "less_or_equal": xpb.CONDITION_OPERATOR_LESS_OR_EQUAL, "<=": xpb.CONDITION_OPERATOR_LESS_OR_EQUAL,
    "exists": xpb.CONDITION_OPERATOR_EXISTS, "not_exists": xpb.CONDITION_OPERATOR_NOT_EXISTS,
}  # fmt: skip
# Michelangelo's defaults (issue 9): a 90/10 split, at least 10,000 units per arm, at most 14 days, 95% confidence
# and 80% power; accuracy +2%, latency regression under 10%, business KPI +5%.
MICHELANGELO_CONTROL_SHARE = 0.9
MICHELANGELO_TREATMENT_SHARE = 0.1
MICHELANGELO_MIN_UNITS = 10_000
MICHELANGELO_MAX_DAYS = 14
MICHELANGELO_ALPHA = 0.05
MICHELANGELO_POWER = 0.8
MICHELANGELO_METRICS = (
    xpb.MetricSpec(
        name="accuracy",
        role=xpb.METRIC_ROLE_SUCCESS,
        kind=xpb.METRIC_KIND_PROPORTION,
        direction=xpb.METRIC_DIRECTION_INCREASE,
        minimum_detectable_effect=0.02,
    ),
    xpb.MetricSpec(
        name="latency_ms",
        role=xpb.METRIC_ROLE_LATENCY,
        kind=xpb.METRIC_KIND_MEAN,
        direction=xpb.METRIC_DIRECTION_DECREASE,
        non_inferiority_margin=0.10,
    ),
    xpb.MetricSpec(
        name="business_kpi",
        role=xpb.METRIC_ROLE_SUCCESS,
        kind=xpb.METRIC_KIND_MEAN,
        direction=xpb.METRIC_DIRECTION_INCREASE,
        minimum_detectable_effect=0.05,
    ),
)
# The margin a LATENCY metric tolerates when it states none, as the contract's default rule does.
DEFAULT_LATENCY_MARGIN = 0.10


class ExperimentFileError(ValueError):
    """The file is not a valid experiment; `problems` lists every one, each starting with its YAML path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


def load(path: Path, template: str | None = None) -> xpb.Experiment:
    """Parse and check an experiment file; `template` (e.g. "michelangelo") overrides the file's `template` key."""
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ExperimentFileError(str(path), [str(err)]) from None
    return parse(document, str(path), template)


def parse(document: object, source: str = "experiment.yaml", template: str | None = None) -> xpb.Experiment:
    """Check a loaded YAML document; ExperimentFileError lists every problem with its YAML path."""
    problems: list[str] = []
    r = Reader(document, "", problems, TOP_FIELDS)
    chosen = template if template is not None else r.text("template") or None
    if chosen is not None and chosen not in TEMPLATES:
        where = "template" if template is None else "--template"
        problems.append(f"{where}: expected one of {', '.join(TEMPLATES)}, got {chosen!r}")
    experiment = xpb.Experiment(
        key=r.text("key", required=True),
        hypothesis=r.text("hypothesis"),
        owner=r.text("owner"),
        type=_choice(r, "type", TYPES, xpb.EXPERIMENT_TYPE_AB_TEST),
        model_name=r.text("model"),
        control_arm=r.text("control"),
        unit_type=r.text("unit_type", required=True),
        salt=r.text("salt"),
        min_units_per_arm=r.integer("min_units_per_arm"),
        labels=r.labels("labels"),
    )
    if experiment.key and not _KEY.match(experiment.key):
        r.problem("key", f"expected lower-case letters, digits, '_', '.' or '-' (not first), got {experiment.key!r}")
    coverage = r.number("coverage", 0.0, 1.0)
    if coverage == 0.0:
        r.problem("coverage", "expected a number in (0, 1], got 0")
    experiment.coverage = coverage or 1.0
    _arms(r, experiment, michelangelo=chosen == "michelangelo")
    for where, item in r.items("targeting"):
        experiment.targeting.append(_condition(Reader(item, where, problems, CONDITION_FIELDS)))
    problems.extend(targeting.problems(experiment.targeting))
    if (namespace := r.child("namespace", NAMESPACE_FIELDS)) is not None:
        experiment.namespace.CopyFrom(_namespace(namespace))
    for where, item in r.items("metrics"):
        experiment.metrics.append(_metric(Reader(item, where, problems, METRIC_FIELDS)))
    _unique(r, "metrics", [m.name for m in experiment.metrics])
    _set(experiment.max_duration, r.duration("max_duration"))
    for where, item in r.items("decision_rule"):
        experiment.decision_rule.criteria.append(_criterion(Reader(item, where, problems, CRITERION_FIELDS)))
    if (statistics := r.child("statistics", STATISTICS_FIELDS)) is not None:
        experiment.statistics.CopyFrom(_statistics(statistics))
    if (bandit := r.child("bandit", BANDIT_FIELDS)) is not None:
        experiment.bandit.CopyFrom(_bandit(bandit, len(experiment.arms)))
        if experiment.type != xpb.EXPERIMENT_TYPE_BANDIT:
            r.problem("bandit", "only for type: bandit")
    if chosen == "michelangelo":
        apply_michelangelo(experiment, given=r.data)
    _cross_check(r, experiment)
    if problems:
        raise ExperimentFileError(source, problems)
    return experiment


def apply_michelangelo(experiment: xpb.Experiment, given: Mapping[str, object]) -> None:
    """Fill Michelangelo's defaults into what the file (its top-level keys in `given`) leaves out; the 90/10
    split is applied by `_arms`, which knows which weights were given."""
    if "min_units_per_arm" not in given:
        experiment.min_units_per_arm = MICHELANGELO_MIN_UNITS
    if "max_duration" not in given:
        experiment.max_duration.FromSeconds(MICHELANGELO_MAX_DAYS * 86400)
    statistics = given.get("statistics")
    stated = statistics if isinstance(statistics, Mapping) else {}
    if "alpha" not in stated:
        experiment.statistics.alpha = MICHELANGELO_ALPHA
    if "power" not in stated:
        experiment.statistics.power = MICHELANGELO_POWER
    if "metrics" not in given:
        experiment.metrics.extend(MICHELANGELO_METRICS)
    if "decision_rule" not in given:
        experiment.decision_rule.criteria.extend(default_rule(experiment.metrics))


def default_rule(metrics: Iterable[xpb.MetricSpec]) -> list[xpb.Criterion]:
    """The contract's default rule, spelled out: MIN_LIFT per SUCCESS metric at its MDE, MAX_REGRESSION per
    LATENCY (10% when unset) and GUARDRAIL metric at its margin, MIN_UNITS and NO_SAMPLE_RATIO_MISMATCH."""
    rule = []
    for metric in metrics:
        if metric.role in (xpb.METRIC_ROLE_SUCCESS, xpb.METRIC_ROLE_UNSPECIFIED):
            lift = metric.minimum_detectable_effect
            rule.append(xpb.Criterion(kind=xpb.CRITERION_KIND_MIN_LIFT, metric=metric.name, threshold=lift))
        else:
            margin = metric.non_inferiority_margin
            if not margin and metric.role == xpb.METRIC_ROLE_LATENCY:
                margin = DEFAULT_LATENCY_MARGIN
            rule.append(xpb.Criterion(kind=xpb.CRITERION_KIND_MAX_REGRESSION, metric=metric.name, threshold=margin))
    rule.append(xpb.Criterion(kind=xpb.CRITERION_KIND_MIN_UNITS))
    rule.append(xpb.Criterion(kind=xpb.CRITERION_KIND_NO_SAMPLE_RATIO_MISMATCH))
    return rule


def _arms(r: Reader, experiment: xpb.Experiment, michelangelo: bool) -> None:
    items = r.items("arms", required=True)
    weighted: list[bool] = []
    for where, item in items:
        arm = Reader(item, where, r.problems, ARM_FIELDS)
        weighted.append(arm.has("weight"))
        experiment.arms.add(
            name=arm.text("name", required=True),
            description=arm.text("description"),
            weight=arm.number("weight") or 0.0,
            model_version=arm.integer("version"),
            parameters=arm.labels("parameters"),
        )
        if experiment.model_name and not experiment.arms[-1].model_version and not arm.has("parameters"):
            arm.problem(arm.at("version"), "required with model: the model version this arm routes to (>= 1)")
    if r.has("arms") and len(items) < 2:
        r.problem("arms", f"expected at least two arms, got {len(items)}")
    _unique(r, "arms", [arm.name for arm in experiment.arms])
    if any(weighted) and not all(weighted):
        for i, given in enumerate(weighted):
            if not given:
                r.problem(f"arms[{i}].weight", "required: give every arm a weight, or none for the default split")
    elif any(weighted) and len(items) >= 2 and not sum(arm.weight for arm in experiment.arms) > 0:
        r.problem("arms", "expected weights with a positive total")
    elif not any(weighted) and len(items) >= 2:
        _default_weights(experiment, michelangelo)


def _default_weights(experiment: xpb.Experiment, michelangelo: bool) -> None:
    """An equal split, or with the template 90% to control and 10% shared by the treatments."""
    count = len(experiment.arms)
    control = _control_index(experiment)
    for i, arm in enumerate(experiment.arms):
        if not michelangelo:
            arm.weight = 1.0 / count
        else:
            share = MICHELANGELO_TREATMENT_SHARE / (count - 1)
            arm.weight = MICHELANGELO_CONTROL_SHARE if i == control else share


def _control_index(experiment: xpb.Experiment) -> int:
    names = [arm.name for arm in experiment.arms]
    return names.index(experiment.control_arm) if experiment.control_arm in names else 0


def _condition(r: Reader) -> xpb.TargetingCondition:
    operator = _choice(r, "op", OPERATORS, xpb.CONDITION_OPERATOR_UNSPECIFIED, required=True)
    condition = xpb.TargetingCondition(attribute=r.text("attribute", required=True), operator=operator)
    raw = r.data.get("values")
    for j, value in enumerate(raw if isinstance(raw, list) else [] if raw is None else [raw]):
        converted = _value(value)
        if converted is None:
            where = f"{r.at('values')}[{j}]" if isinstance(raw, list) else r.at("values")
            r.problem(where, f"expected a string, number or boolean, got {type(value).__name__}")
        else:
            condition.values.append(converted)
    return condition


def _value(value: object) -> values_pb2.Value | None:
    if isinstance(value, bool | int | float | str):
        return to_value(value)
    return None


def _namespace(r: Reader) -> xpb.Namespace:
    namespace = xpb.Namespace(id=r.text("id", required=True), start=r.integer("start"), end=r.integer("end", 1))
    if not r.has("end"):
        r.problem(r.at("end"), f"required; expected an integer in (start, {BUCKETS}]")
    if namespace.start >= BUCKETS:
        r.problem(r.at("start"), f"expected an integer in [0, {BUCKETS}), got {namespace.start}")
    elif r.has("end") and not namespace.start < namespace.end <= BUCKETS:
        r.problem(r.at("end"), f"expected an integer in ({namespace.start}, {BUCKETS}], got {namespace.end}")
    return namespace


def _metric(r: Reader) -> xpb.MetricSpec:
    metric = xpb.MetricSpec(
        name=r.text("name", required=True),
        description=r.text("description"),
        role=_choice(r, "role", ROLES, xpb.METRIC_ROLE_SUCCESS),
        kind=_choice(r, "kind", KINDS, xpb.METRIC_KIND_MEAN),
        direction=_choice(r, "direction", DIRECTIONS, xpb.METRIC_DIRECTION_INCREASE),
        event=r.text("event"),
        denominator_event=r.text("denominator"),
        minimum_detectable_effect=r.number("mde") or 0.0,
        non_inferiority_margin=r.number("margin") or 0.0,
        cap=r.number("cap") or 0.0,
    )
    if metric.kind == xpb.METRIC_KIND_RATIO and not r.has("denominator"):
        r.problem(r.at("denominator"), "required for kind ratio; expected the denominator's event name")
    elif metric.kind != xpb.METRIC_KIND_RATIO and r.has("denominator"):
        r.problem(r.at("denominator"), "only for kind ratio")
    if (cuped := r.child("cuped", CUPED_FIELDS)) is not None:
        metric.cuped.CopyFrom(xpb.Cuped(covariate_event=cuped.text("covariate")))
        _set(metric.cuped.pre_exposure_window, cuped.duration("window"))
    return metric


def _criterion(r: Reader) -> xpb.Criterion:
    kind = _choice(r, "kind", CRITERIA, xpb.CRITERION_KIND_UNSPECIFIED, required=True)
    criterion = xpb.Criterion(kind=kind, metric=r.text("metric"), threshold=r.number("threshold") or 0.0)
    if kind in _METRIC_CRITERIA and not criterion.metric:
        r.problem(r.at("metric"), f"required for {_name(CRITERIA, kind)}; expected a metric name")
    elif kind not in _METRIC_CRITERIA and criterion.metric:
        r.problem(r.at("metric"), f"only for {' and '.join(_name(CRITERIA, k) for k in sorted(_METRIC_CRITERIA))}")
    return criterion


def _statistics(r: Reader) -> xpb.StatisticsSettings:
    settings = xpb.StatisticsSettings(fixed_horizon=r.flag("fixed_horizon"))
    for field in ("alpha", "power", "srm_p_value"):
        value = r.number(field, 0.0, 1.0)
        if value is not None and not 0.0 < value < 1.0:
            r.problem(r.at(field), f"expected a number in (0, 1), got {num(value)}")
        setattr(settings, field, value or 0.0)
    settings.srm_min_deviation = r.number("srm_min_deviation") or 0.0
    return settings


def _bandit(r: Reader, arms: int) -> xpb.BanditSettings:
    settings = xpb.BanditSettings(reward_metric=r.text("reward"), min_units_per_arm=r.integer("min_units"))
    _set(settings.update_interval, r.duration("update_interval"))
    share = r.number("min_share", 0.0, 1.0)
    if share is not None and arms and share >= 1.0 / arms:
        r.problem(r.at("min_share"), f"expected a number in [0, 1/{arms}), got {num(share)}")
    settings.min_arm_share = share or 0.0
    return settings


def _cross_check(r: Reader, experiment: xpb.Experiment) -> None:
    """Names that must point at something the file declares."""
    arms = [arm.name for arm in experiment.arms]
    if experiment.control_arm and arms and experiment.control_arm not in arms:
        r.problem("control", f"expected one of the arms ({', '.join(arms)}), got {experiment.control_arm!r}")
    metrics = [metric.name for metric in experiment.metrics]
    for i, criterion in enumerate(experiment.decision_rule.criteria):
        if criterion.metric and criterion.metric not in metrics:
            expected = f"expected one of the metrics ({_listed(metrics)}), got {criterion.metric!r}"
            r.problem(f"decision_rule[{i}].metric", expected)
    reward = experiment.bandit.reward_metric
    if reward and reward not in metrics:
        r.problem("bandit.reward", f"expected one of the metrics ({_listed(metrics)}), got {reward!r}")
    if any(arm.model_version for arm in experiment.arms) and not experiment.model_name:
        r.problem("model", "required when arms name versions; expected the model's name")


def _choice(r: Reader, key: str, choices: Mapping[str, E], default: E, required: bool = False) -> E:
    names = ", ".join(sorted(name for name in choices if name.isidentifier()))
    return r.get(key, lambda v: choices.get(v) if isinstance(v, str) else None, f"one of {names}", default, required)


def _name(choices: Mapping[str, int], value: int) -> str:
    return next(name for name, v in choices.items() if v == value)


def _unique(r: Reader, field: str, names: list[str]) -> None:
    for i, name in enumerate(names):
        if name and name in names[:i]:
            r.problem(f"{field}[{i}].name", f"{name!r} is declared twice")


def _listed(names: list[str]) -> str:
    return ", ".join(names) or "none declared"


def _set(field: duration_pb2.Duration, value: duration_pb2.Duration | None) -> None:
    if value is not None:
        field.CopyFrom(value)
