"""How the CLI shows experiments and their results: plain functions of proto messages returning text or rich
renderables, so they are tested on real messages without a server."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table

from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.api.experiments.v1 import experiment_service_pb2 as spb
from fresco.api.experiments.v1 import results_pb2 as rpb
from fresco.experiments.targeting import scalar
from fresco.rollout_view import duration_text, enum_name, when

_STATUS_STYLE = {
    xpb.EXPERIMENT_STATUS_RUNNING: "green",
    xpb.EXPERIMENT_STATUS_STOPPED: "yellow",
    xpb.EXPERIMENT_STATUS_DECIDED: "cyan",
}
ACTION_STYLE = {
    xpb.DECISION_ACTION_SHIP_TREATMENT: "green",
    xpb.DECISION_ACTION_KEEP_CONTROL: "red",
    xpb.DECISION_ACTION_CONTINUE: "yellow",
}
GUARDED_ROLES = (xpb.METRIC_ROLE_GUARDRAIL, xpb.METRIC_ROLE_LATENCY)


def status_name(status: int) -> str:
    """EXPERIMENT_STATUS_RUNNING as "RUNNING"."""
    return enum_name(xpb.ExperimentStatus, status, "EXPERIMENT_STATUS_")


def type_name(kind: int) -> str:
    """EXPERIMENT_TYPE_BANDIT as "bandit"; unset is an A/B test, as the contract says."""
    return "bandit" if kind == xpb.EXPERIMENT_TYPE_BANDIT else "ab"


def action_name(action: int) -> str:
    """DECISION_ACTION_SHIP_TREATMENT as "SHIP_TREATMENT"."""
    return enum_name(xpb.DecisionAction, action, "DECISION_ACTION_")


def lower_name(enum: object, value: int, prefix: str) -> str:
    """METRIC_ROLE_LATENCY as "latency"."""
    return enum_name(enum, value, prefix).lower()


def percent(value: float, signed: bool = True) -> str:
    """A share or relative change as "+2.31%" ("n/a" when not finite)."""
    if not math.isfinite(value):
        return "n/a"
    return f"{value * 100:+.2f}%" if signed else f"{value * 100:.2f}%"


def interval_text(interval: rpb.Interval) -> str:
    """A relative interval as "[-0.51%, +4.12%]"."""
    return f"[{percent(interval.lower)}, {percent(interval.upper)}]"


def number(value: float) -> str:
    """A number with four significant digits ("n/a" when not finite)."""
    return f"{value:.4g}" if math.isfinite(value) else "n/a"


def p_value_text(value: float) -> str:
    """A p-value: three significant digits, scientific below 0.001."""
    return f"{value:.3g}" if value >= 0.001 or value == 0 else f"{value:.1e}"


def _styled(text: str, style: str | None) -> str:
    return f"[{style}]{escape(text)}[/{style}]" if style else escape(text)


def weights_text(experiment: xpb.Experiment) -> str:
    """The arms and their shares, e.g. "control v1 90% · treatment v2 10%"."""
    total = sum(arm.weight for arm in experiment.arms) or 1.0
    parts = []
    for arm in experiment.arms:
        version = f" v{arm.model_version}" if arm.model_version else ""
        parts.append(f"{arm.name}{version} {arm.weight / total * 100:.4g}%")
    return " · ".join(parts)


def experiment_summary(experiment: xpb.Experiment) -> str:
    """One line: key, version, status, phase and weights."""
    phase = f", phase {experiment.phases[-1].number}" if experiment.phases else ""
    return (
        f"{experiment.key} (version {experiment.version}): {status_name(experiment.status)}{phase}, "
        f"{weights_text(experiment)}"
    )


def experiments_table(experiments: Sequence[xpb.Experiment]) -> Table:
    """`fresco experiments list`: one row per experiment."""
    table = Table(title="Experiments")
    for column in ("key", "status", "type", "model", "arms", "coverage", "phase", "version", "owner", "updated (UTC)"):
        table.add_column(column)
    for e in experiments:
        table.add_row(
            escape(e.key),
            _styled(status_name(e.status), _STATUS_STYLE.get(e.status)),
            type_name(e.type),
            escape(e.model_name or "-"),
            escape(weights_text(e)),
            percent(e.coverage, signed=False),
            str(e.phases[-1].number) if e.phases else "-",
            str(e.version),
            escape(e.owner or "-"),
            when(e.updated_at),
        )
    return table


def condition_text(condition: xpb.TargetingCondition) -> str:
    """A targeting condition, e.g. "country in ('FR', 'DE')"."""
    op = lower_name(xpb.ConditionOperator, condition.operator, "CONDITION_OPERATOR_")
    values = [scalar(v) for v in condition.values]
    if not values:
        return f"{condition.attribute} {op}"
    shown = repr(values[0]) if len(values) == 1 else repr(tuple(values))
    return f"{condition.attribute} {op} {shown}"


def criterion_text(criterion: xpb.Criterion) -> str:
    """A decision criterion, e.g. "min_lift accuracy >= +2.00%"."""
    kind = criterion.kind
    name = lower_name(xpb.CriterionKind, kind, "CRITERION_KIND_")
    if kind == xpb.CRITERION_KIND_MIN_LIFT:
        return f"{name} {criterion.metric} >= {percent(criterion.threshold)}"
    if kind == xpb.CRITERION_KIND_MAX_REGRESSION:
        return f"{name} {criterion.metric} <= {percent(criterion.threshold, signed=False)}"
    if kind == xpb.CRITERION_KIND_MIN_UNITS:
        return f"{name} >= {criterion.threshold:.0f}" if criterion.threshold else f"{name} (the experiment's minimum)"
    return name


def decision_record_text(record: xpb.DecisionRecord) -> str:
    """A decision taken, e.g. "SHIP_TREATMENT treatment (phase 1) by alice at ...; rollout r-1: reason"."""
    text = action_name(record.action) + (f" {record.arm}" if record.arm else "")
    text += f" (phase {record.phase})" if record.phase else ""
    text += " overriding the recommendation" if record.overridden else ""
    text += f" by {record.decided_by}" if record.decided_by else ""
    text += f" at {when(record.decided_at)}" if record.decided_at.seconds else ""
    text += f"; gates: operation {record.promotion_operation}" if record.promotion_operation else ""
    text += f"; rollout {record.rollout_id}" if record.rollout_id else ""
    return f"{text}: {record.reason}" if record.reason else text


def _settings_rows(e: xpb.Experiment) -> list[tuple[str, str]]:
    rows = [
        ("experiment", f"{e.key} · version {e.version}"),
        ("hypothesis", e.hypothesis or "-"),
        ("owner", e.owner or "-"),
        ("type", type_name(e.type)),
        ("model", e.model_name or "- (parameter arms)"),
        ("unit", e.unit_type),
        ("coverage", percent(e.coverage, signed=False)),
        ("salt", e.salt or "(the key)"),
    ]
    if e.HasField("namespace"):
        rows.append(("namespace", f"{e.namespace.id} [{e.namespace.start}, {e.namespace.end})"))
    if e.targeting:
        rows.append(("targeting", " and ".join(condition_text(c) for c in e.targeting)))
    rows.append(("min units per arm", f"{e.min_units_per_arm:,}" if e.min_units_per_arm else "-"))
    duration = e.max_duration
    rows.append(("max duration", duration_text(duration) if duration.seconds or duration.nanos else "-"))
    s = e.statistics
    method = "fixed horizon" if s.fixed_horizon else "always-valid (sequential)"
    rows.append(("statistics", f"alpha {number(s.alpha or 0.05)}, power {number(s.power or 0.8)}, {method}"))
    if e.type == xpb.EXPERIMENT_TYPE_BANDIT:
        b = e.bandit
        every = duration_text(b.update_interval) if b.update_interval.seconds else "60s"
        floor = number(b.min_arm_share or 0.05)
        reward = b.reward_metric or "(first metric)"
        least = b.min_units_per_arm or 100
        rows.append(("bandit", f"reward {reward}, every {every}, floor {floor}, min units {least}"))
    if e.labels:
        rows.append(("labels", ", ".join(f"{k}={v}" for k, v in sorted(e.labels.items()))))
    return rows


def _status_rows(e: xpb.Experiment) -> list[tuple[str, str]]:
    rows = [("created", f"{when(e.created_at)}"), ("updated", f"{when(e.updated_at)} by {e.updated_by or '-'}")]
    if e.started_at.seconds:
        rows.append(("started", when(e.started_at)))
    if e.stopped_at.seconds:
        rows.append(("stopped", when(e.stopped_at) + (f": {e.stop_reason}" if e.stop_reason else "")))
    if e.HasField("decision"):
        rows.append(("decision", decision_record_text(e.decision)))
    return rows


def experiment_view(experiment: xpb.Experiment, audit: Sequence[spb.AuditEntry] = ()) -> RenderableType:
    """`fresco experiments show`: configuration, status, arms, metrics, decision rule, phases and audit."""
    e = experiment
    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_column(style="bold", no_wrap=True)
    head.add_column()
    head.add_row("status", _styled(status_name(e.status), _STATUS_STYLE.get(e.status)))
    for name, value in [*_settings_rows(e), *_status_rows(e)]:
        head.add_row(name, escape(value))
    control = e.control_arm or (e.arms[0].name if e.arms else "")
    arms = Table(title="Arms")
    for column in ("arm", "version", "weight", "parameters", "description"):
        arms.add_column(column)
    total = sum(arm.weight for arm in e.arms) or 1.0
    for arm in e.arms:
        name = arm.name + (" (control)" if arm.name == control else "")
        parameters = ", ".join(f"{k}={v}" for k, v in sorted(arm.parameters.items()))
        version = f"v{arm.model_version}" if arm.model_version else "-"
        weight = percent(arm.weight / total, signed=False)
        arms.add_row(escape(name), version, weight, escape(parameters or "-"), escape(arm.description or "-"))
    parts: list[RenderableType] = [head, arms, metrics_table(e.metrics)]
    rule = Table(title="Decision rule" + ("" if e.decision_rule.criteria else " (the default template)"))
    rule.add_column("criterion")
    for criterion in e.decision_rule.criteria:
        rule.add_row(escape(criterion_text(criterion)))
    parts.append(rule)
    parts.append(phases_table(e))
    if audit:
        parts.append(audit_table(audit))
    return Group(*parts)


def metrics_table(metrics: Sequence[xpb.MetricSpec]) -> Table:
    """The metrics of an experiment with their role, kind, direction, event, MDE, margin, CUPED and cap."""
    table = Table(title="Metrics")
    for column in ("metric", "role", "kind", "direction", "event", "mde", "margin", "cuped", "cap"):
        table.add_column(column)
    for m in metrics:
        event = m.event or m.name
        if m.kind == xpb.METRIC_KIND_RATIO:
            event += f" / {m.denominator_event}"
        cuped = "-"
        if m.HasField("cuped"):
            window = m.cuped.pre_exposure_window
            shown = duration_text(window) if window.seconds else "14d"
            cuped = f"{m.cuped.covariate_event or event}, {shown} before"
        table.add_row(
            escape(m.name),
            lower_name(xpb.MetricRole, m.role or xpb.METRIC_ROLE_SUCCESS, "METRIC_ROLE_"),
            lower_name(xpb.MetricKind, m.kind or xpb.METRIC_KIND_MEAN, "METRIC_KIND_"),
            lower_name(xpb.MetricDirection, m.direction or xpb.METRIC_DIRECTION_INCREASE, "METRIC_DIRECTION_"),
            escape(event),
            percent(m.minimum_detectable_effect) if m.minimum_detectable_effect else "-",
            percent(m.non_inferiority_margin, signed=False) if m.non_inferiority_margin else "-",
            escape(cuped),
            number(m.cap) if m.cap else "-",
        )
    return table


def phases_table(experiment: xpb.Experiment) -> Table:
    """The phases: number, weights, the version that started each, start and end."""
    table = Table(title="Phases")
    for column in ("phase", "weights", "version", "started (UTC)", "ended (UTC)"):
        table.add_column(column)
    names = [arm.name for arm in experiment.arms]
    for phase in experiment.phases:
        total = sum(phase.weights) or 1.0
        weights = " · ".join(
            f"{names[i] if i < len(names) else i} {w / total * 100:.4g}%" for i, w in enumerate(phase.weights)
        )
        table.add_row(
            str(phase.number), escape(weights), str(phase.experiment_version), when(phase.started_at),
            when(phase.ended_at),
        )  # fmt: skip
    return table


def audit_table(entries: Sequence[spb.AuditEntry]) -> Table:
    """An experiment's changes, oldest first: version, time, identity, action, detail."""
    table = Table(title="Audit")
    for column in ("version", "when (UTC)", "who", "action", "detail"):
        table.add_column(column)
    for entry in entries:
        table.add_row(
            str(entry.version), when(entry.at), escape(entry.identity), escape(entry.action), escape(entry.detail)
        )
    return table
