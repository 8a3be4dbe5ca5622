"""How the CLI shows an experiment's results: arms, per-metric estimates and comparisons (lift with its confidence
interval and always-valid confidence sequence, p-values, CUPED, non-inferiority, power), the sample-ratio check and
the decision with every check; plain functions of `ExperimentResults`, tested without a server."""

from __future__ import annotations

from google.protobuf import duration_pb2
from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.api.experiments.v1 import results_pb2 as rpb
from fresco.experiments_view import (
    ACTION_STYLE,
    GUARDED_ROLES,
    action_name,
    criterion_text,
    interval_text,
    lower_name,
    number,
    p_value_text,
    percent,
)
from fresco.rollout_view import duration_text, when

_PASS = "[green]pass[/green]"
_FAIL = "[red]FAIL[/red]"


def results_view(results: rpb.ExperimentResults) -> RenderableType:
    """`fresco experiments results`: every part of the analysis of one phase."""
    running = duration_text(_seconds(results.running_for_seconds))
    head = Text(
        f"{results.experiment_key} · version {results.experiment_version} · phase {results.phase} · "
        f"running {running} · computed {when(results.computed_at)} UTC · control {results.control_arm}"
    )
    parts: list[RenderableType] = [head, arms_table(results)]
    for metric in results.metrics:
        parts.append(metric_table(metric, results.control_arm))
    parts.append(Text.from_markup(srm_line(results.sample_ratio)))
    parts.append(decision_view(results.decision))
    return Group(*parts)


def _seconds(value: float) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=round(max(value, 0.0)))


def arms_table(results: rpb.ExperimentResults) -> Table:
    """Per arm: model version, exposed units, current weight and the probability of being best."""
    table = Table(title="Arms")
    for column in ("arm", "version", "units", "weight", "P(best)"):
        table.add_column(column, justify="right" if column in ("units", "weight", "P(best)") else "left")
    for arm in results.arms:
        name = arm.arm_name + (" (control)" if arm.arm_name == results.control_arm else "")
        table.add_row(
            escape(name),
            f"v{arm.model_version}" if arm.model_version else "-",
            f"{arm.units:,}",
            percent(arm.weight, signed=False),
            percent(arm.probability_best, signed=False),
        )
    return table


def metric_table(metric: rpb.MetricResult, control: str) -> Table:
    """One metric: each arm's estimate, then each treatment's comparison with control."""
    role = lower_name(xpb.MetricRole, metric.role or xpb.METRIC_ROLE_SUCCESS, "METRIC_ROLE_")
    kind = lower_name(xpb.MetricKind, metric.kind or xpb.METRIC_KIND_MEAN, "METRIC_KIND_")
    better = "lower" if metric.direction == xpb.METRIC_DIRECTION_DECREASE else "higher"
    title = f"{metric.metric_name} ({role}, {kind}, {better} is better)"
    table = Table(title=escape(title), caption=escape(power_text(metric.power)) or None)
    for column in ("arm", "units", "mean", "lift", "CI", "sequential CS", "p", "seq. p", "P(better)", "notes"):
        table.add_column(column, justify="left" if column in ("arm", "notes") else "right")
    comparisons = {c.arm_name: c for c in metric.comparisons}
    guarded = metric.role in GUARDED_ROLES
    cuped = any(c.cuped_applied for c in metric.comparisons)
    for summary in metric.arms:
        mean = number(summary.mean)
        if cuped:
            mean = f"{number(summary.adjusted_mean)} (raw {number(summary.mean)})"
        comparison = comparisons.get(summary.arm_name)
        if comparison is None:
            name = summary.arm_name + (" (control)" if summary.arm_name == control else "")
            table.add_row(escape(name), f"{summary.units:,}", mean, *["-"] * 6, "")
            continue
        table.add_row(
            escape(summary.arm_name),
            f"{summary.units:,}",
            mean,
            _lift(comparison),
            interval_text(comparison.interval),
            interval_text(comparison.sequential_interval),
            p_value_text(comparison.p_value),
            p_value_text(comparison.sequential_p_value),
            percent(comparison.probability_to_beat_control, signed=False),
            notes_text(comparison, summary, guarded),
        )
    return table


def _lift(comparison: rpb.Comparison) -> str:
    text = percent(comparison.relative_lift)
    return f"[bold]{text}[/bold]" if comparison.significant else text


def notes_text(comparison: rpb.Comparison, summary: rpb.MetricSummary, guarded: bool) -> str:
    """Significance, CUPED (variance reduction, units with a covariate) and non-inferiority, as markup."""
    notes = ["significant" if comparison.significant else "not significant"]
    if comparison.cuped_applied:
        notes.append(
            f"CUPED: variance -{comparison.variance_reduction * 100:.1f}%, "
            f"{summary.units_with_covariate:,}/{summary.units:,} units with prior data"
        )
    if guarded:
        notes.append("[green]non-inferior[/green]" if comparison.non_inferior else "[red]not non-inferior[/red]")
    return "; ".join(notes)


def power_text(plan: rpb.PowerPlan) -> str:
    """The power plan, e.g. "MDE +2.00%: 9,812 units per arm for the planned power; power now 43.1%"."""
    if not plan.minimum_detectable_effect and not plan.required_units_per_arm:
        return ""
    return (
        f"MDE {percent(plan.minimum_detectable_effect)}: {plan.required_units_per_arm:,} units per arm for the "
        f"planned power; power now {percent(plan.achieved_power, signed=False)}"
    )


def srm_line(check: rpb.SampleRatioCheck) -> str:
    """The sample-ratio check as one line of markup, with each arm's observed against expected units."""
    verdict = "[red]MISMATCH[/red]" if check.mismatch else "[green]ok[/green]"
    arms = ", ".join(f"{escape(a.arm_name)} {a.observed_units:,}/{a.expected_units:,.0f}" for a in check.arms)
    return (
        f"sample ratio: {verdict} (χ² {number(check.chi_square)}, p {p_value_text(check.p_value)}, max deviation "
        f"{percent(check.max_relative_deviation, signed=False)}; observed/expected units: {arms or 'none'})"
    )


def check_value_text(check: rpb.DecisionCheck) -> tuple[str, str]:
    """A check's value and threshold in its own unit: a relative change, a unit count or a p-value."""
    kind = check.criterion.kind
    if kind in (xpb.CRITERION_KIND_MIN_LIFT, xpb.CRITERION_KIND_MAX_REGRESSION):
        signed = kind == xpb.CRITERION_KIND_MIN_LIFT
        return percent(check.value, signed), percent(check.threshold, signed)
    if kind == xpb.CRITERION_KIND_MIN_UNITS:
        return f"{check.value:,.0f}", f"{check.threshold:,.0f}"
    return p_value_text(check.value), p_value_text(check.threshold)


def decision_view(decision: rpb.Decision) -> RenderableType:
    """The recommendation and a table of every check: arm, criterion, value, threshold, passed, detail."""
    action = action_name(decision.action)
    style = ACTION_STYLE.get(decision.action, "bold")
    line = f"decision: [{style}]{escape(action)}[/{style}]"
    line += f" {escape(decision.arm)}" if decision.arm else ""
    line += f": {escape(decision.reason)}" if decision.reason else ""
    table = Table(title="Decision checks")
    for column in ("arm", "criterion", "value", "threshold", "passed", "detail"):
        table.add_column(column, justify="right" if column in ("value", "threshold") else "left")
    for check in decision.checks:
        value, threshold = check_value_text(check)
        passed = _PASS if check.passed else _FAIL + (" (conclusive)" if check.conclusive else "")
        table.add_row(
            escape(check.arm_name), escape(criterion_text(check.criterion)), value, threshold, passed,
            escape(check.detail),
        )  # fmt: skip
    return Group(Text.from_markup(line), table)
