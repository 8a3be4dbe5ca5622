"""How the CLI shows rollouts, promotions, deployments and the audit log: plain functions of proto messages
returning text or rich renderables, so they are tested on real messages without a server."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from google.protobuf import duration_pb2, timestamp_pb2
from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.api.models.v1 import rollout_pb2 as ro

ACTIVE = frozenset(
    {ro.ROLLOUT_STATE_PENDING, ro.ROLLOUT_STATE_PROGRESSING, ro.ROLLOUT_STATE_PAUSED, ro.ROLLOUT_STATE_ROLLING_BACK}
)
# Exit codes of `fresco rollout status --watch` once the rollout ends: success, rolled back (or aborted), failed.
EXIT_CODES = {
    ro.ROLLOUT_STATE_SUCCEEDED: 0,
    ro.ROLLOUT_STATE_ROLLED_BACK: 3,
    ro.ROLLOUT_STATE_ABORTED: 3,
    ro.ROLLOUT_STATE_FAILED: 4,
}
_STATE_STYLE = {
    ro.ROLLOUT_STATE_SUCCEEDED: "green",
    ro.ROLLOUT_STATE_ROLLED_BACK: "red",
    ro.ROLLOUT_STATE_ROLLING_BACK: "red",
    ro.ROLLOUT_STATE_FAILED: "red",
    ro.ROLLOUT_STATE_ABORTED: "yellow",
    ro.ROLLOUT_STATE_PAUSED: "yellow",
}
_VERDICT_STYLE = {
    ro.ANALYSIS_VERDICT_PASSED: "green",
    ro.ANALYSIS_VERDICT_FAILED: "red",
    ro.ANALYSIS_VERDICT_INCONCLUSIVE: "yellow",
    ro.ANALYSIS_VERDICT_ERROR: "magenta",
}


def enum_name(enum: object, value: int, prefix: str) -> str:
    """An enum value's name without its prefix; the number for a value this client does not know."""
    try:
        return enum.Name(value).removeprefix(prefix)  # type: ignore[attr-defined, no-any-return]
    except ValueError:  # open enums: a newer server may send values this client does not know
        return str(value)


def state_name(state: int) -> str:
    """ROLLOUT_STATE_ROLLED_BACK as "ROLLED_BACK"."""
    return enum_name(ro.RolloutState, state, "ROLLOUT_STATE_")


def verdict_name(verdict: int) -> str:
    """ANALYSIS_VERDICT_FAILED as "FAILED"."""
    return enum_name(ro.AnalysisVerdict, verdict, "ANALYSIS_VERDICT_")


def check_name(check: int) -> str:
    """ANALYSIS_CHECK_ERROR_RATE as "error_rate"."""
    return enum_name(ro.AnalysisCheck, check, "ANALYSIS_CHECK_").lower()


def stage_name(stage: int) -> str:
    """MODEL_STAGE_PRODUCTION as "production"."""
    return enum_name(rpb.ModelStage, stage, "MODEL_STAGE_").lower()


def duration_text(duration: duration_pb2.Duration) -> str:
    """A duration as "500ms", "45s", "5m", "1h30m", "14d"."""
    total = duration.seconds + duration.nanos / 1e9
    if total < 1 and total > 0:
        return f"{total * 1000:g}ms"
    days, rest = divmod(int(total), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{days}d" if days else "", f"{hours}h" if hours else "", f"{minutes}m" if minutes else ""]
    parts.append(f"{seconds}s" if seconds else "")
    return "".join(parts) or "0s"


def clock(stamp: timestamp_pb2.Timestamp) -> str:
    """A timestamp as UTC HH:MM:SS; "-" when unset."""
    if not stamp.seconds and not stamp.nanos:
        return "-"
    return datetime.fromtimestamp(stamp.seconds, UTC).strftime("%H:%M:%S")


def when(stamp: timestamp_pb2.Timestamp) -> str:
    """A timestamp as UTC date and time; "-" when unset."""
    if not stamp.seconds and not stamp.nanos:
        return "-"
    return datetime.fromtimestamp(stamp.seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _num(value: float) -> str:
    return f"{value:.4g}"


def strategy_text(strategy: ro.RolloutStrategy) -> str:
    """The strategy in a few words, e.g. "canary 10% → 50% → 100%"."""
    kind = strategy.WhichOneof("kind")
    if kind == "canary":
        weights = [
            f"{_num(step.traffic_percent)}%" + (f" (n≥{step.min_samples})" if step.min_samples else "")
            for step in strategy.canary.steps
        ]
        return "canary " + " → ".join([*weights, "100%"])
    if kind == "blue_green":
        bg = strategy.blue_green
        keep, warmup = bg.keep_previous_for, bg.warmup
        text = "blue-green" + (f", warm-up {duration_text(warmup)}" if warmup.seconds or warmup.nanos else "")
        text += ", manual switch" if bg.manual_switch else ""
        return text + (f", previous kept {duration_text(keep)}" if keep.seconds or keep.nanos else "")
    if kind == "shadow":
        return f"shadow, {_num(strategy.shadow.mirror_percent)}% mirrored"
    return "no strategy"


def step_text(rollout: ro.Rollout) -> str:
    """Where a canary is, e.g. "step 2/3 at 50%", or "full" on the all-traffic phase after its steps; empty for
    other strategies."""
    if not rollout.step_count:
        return ""
    index = rollout.current_step_index
    steps = rollout.strategy.canary.steps
    if index >= rollout.step_count:
        return "full"
    weight = f" at {_num(steps[index].traffic_percent)}%" if 0 <= index < len(steps) else ""
    return f"step {index + 1}/{rollout.step_count}{weight}"


def traffic_text(rollout: ro.Rollout) -> str:
    """The live and mirrored share of each version, e.g. "v1 90% · v2 10% (+5% mirrored)"."""
    parts = []
    for share in sorted(rollout.traffic, key=lambda t: t.version):
        mirror = f" (+{_num(share.mirror_percent)}% mirrored)" if share.mirror_percent else ""
        parts.append(f"v{share.version} {_num(share.traffic_percent)}%{mirror}")
    return " · ".join(parts) or "no traffic"


def decision_text(result: ro.AnalysisResult) -> str:
    """One decision with its reason as data: metric, measured value against threshold, samples and window."""
    verdict = verdict_name(result.verdict)
    if result.check == ro.ANALYSIS_CHECK_SAMPLES:
        measured = f"samples {result.measured_value:g}/{result.threshold:g}"
    else:
        relation = {ro.ANALYSIS_VERDICT_PASSED: "<=", ro.ANALYSIS_VERDICT_FAILED: ">"}.get(result.verdict, "vs")
        measured = f"{check_name(result.check)} {_num(result.measured_value)} {relation} {_num(result.threshold)}"
    samples = f"n={result.sample_count}"
    if result.baseline_sample_count:  # no baseline served alongside: none is shown
        samples += f", baseline {_num(result.baseline_value)} n={result.baseline_sample_count}"
    if result.min_samples:
        samples += f", min {result.min_samples}"
    window = f"window {clock(result.window_start)}–{clock(result.window_end)}"
    text = f"{verdict} v{result.version} {measured} ({samples}) {window} step {result.step_index + 1}"
    return f"{text}: {result.detail}" if result.detail else text


def event_text(event: ro.RolloutEvent) -> str:
    """One event of the history, e.g. "10:02:03 ROLLED_BACK (ROLLED_BACK) step 2: error_rate ... by alice"."""
    kind = enum_name(ro.RolloutEventType, event.type, "ROLLOUT_EVENT_TYPE_")
    text = f"{clock(event.time)} {kind} → {state_name(event.state)} at step {event.step_index + 1}"
    if event.reason:
        text += f": {event.reason}"
    if event.actor:
        text += f" (by {event.actor})"
    return text


def _styled(text: str, style: str | None) -> str:
    return f"[{style}]{escape(text)}[/{style}]" if style else escape(text)


def rollout_summary(rollout: ro.Rollout) -> str:
    """One line: model, version, state, where it is and the traffic."""
    where = step_text(rollout)
    parts = [
        f"{rollout.model_name} v{rollout.version} (baseline v{rollout.baseline_version or '-'})",
        state_name(rollout.state),
        *([where] if where else []),
        traffic_text(rollout),
    ]
    return ": ".join(parts[:2]) + "".join(f", {p}" for p in parts[2:])


def rollout_view(rollout: ro.Rollout, recent_events: int = 5) -> RenderableType:
    """The live view of `fresco rollout status`: strategy, step, weights, state, the last verdict with each
    decision's metric, value, threshold, samples and window, and the last events."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    state = _styled(state_name(rollout.state), _STATE_STYLE.get(rollout.state))
    table.add_row("rollout", escape(f"{rollout.rollout_id} · {rollout.model_name} v{rollout.version}"))
    table.add_row("strategy", escape(strategy_text(rollout.strategy)))
    table.add_row("state", state + (f" · {escape(step_text(rollout))}" if rollout.step_count else ""))
    if rollout.step_count:
        done = rollout.step_count if rollout.state == ro.ROLLOUT_STATE_SUCCEEDED else rollout.current_step_index
        table.add_row("steps", f"{'█' * done}{'░' * (rollout.step_count - done)} {done}/{rollout.step_count} done")
    table.add_row("traffic", escape(traffic_text(rollout)))
    table.add_row("baseline", f"v{rollout.baseline_version}" if rollout.baseline_version else "none")
    routes = f"published {rollout.published_revision}, applied by the gateways {rollout.applied_revision}"
    table.add_row("routes", routes)
    if rollout.message:
        table.add_row("message", escape(rollout.message))
    table.add_row("generation", f"{rollout.generation} · attempt {rollout.attempt}")
    if rollout.gate_operation_id:
        table.add_row("gates", escape(f"operation {rollout.gate_operation_id}"))
    parts: list[RenderableType] = [table]
    if rollout.gate_results:
        parts.append(Text("promotion gates", style="bold"))
        parts.extend(Text("  " + gate_text(result)) for result in rollout.gate_results)
    if rollout.analysis_results:
        parts.append(Text("last verdict", style="bold"))
        for result in rollout.analysis_results:
            parts.append(Text.from_markup("  " + _styled(decision_text(result), _VERDICT_STYLE.get(result.verdict))))
    for nack in rollout.xds_nacks[:3]:
        parts.append(Text(f"xDS NACK from {nack.node_id} ({nack.type_url} {nack.version_info}): {nack.error}"))
    if rollout.events and recent_events:
        parts.append(Text("events", style="bold"))
        parts.extend(Text("  " + event_text(event)) for event in rollout.events[-recent_events:])
    return Group(*parts)


def event_lines(event: ro.RolloutEvent) -> list[str]:
    """An event and, indented under it, the decisions behind it."""
    return [event_text(event), *("    " + decision_text(d) for d in event.decisions)]


def gate_text(result: rpb.GateResult) -> str:
    """One promotion gate check, e.g. "PASS backtest.auc: 0.9838 vs threshold 0.9 (detail)"."""
    mark = "PASS" if result.passed else "FAIL"
    if not _numeric(result):  # e.g. the schema checks: a yes or no, said by the detail
        return f"{mark} {result.name}: {result.detail or ('passed' if result.passed else 'failed')}"
    text = f"{mark} {result.name}: {_num(result.measured_value)} vs threshold {_num(result.threshold)}"
    return f"{text} ({result.detail})" if result.detail else text


def _numeric(result: rpb.GateResult) -> bool:
    """Whether a gate check compares a measure with a threshold (schema checks and unset numbers do not)."""
    if result.type == rpb.GATE_TYPE_SCHEMA:
        return False
    return bool(result.measured_value or result.threshold)


def operation_text(operation: rpb.Operation) -> str:
    """Where a promotion is, e.g. "promote demo v2 to production: SUCCEEDED, stage production"."""
    state = enum_name(rpb.OperationState, operation.state, "OPERATION_STATE_")
    text = (
        f"{operation.kind or 'operation'} {operation.model_name} v{operation.version} to "
        f"{stage_name(operation.target_stage)}: {state}, stage {stage_name(operation.stage)}"
    )
    if operation.forced:
        text += " (forced over failed gates)"
    if operation.dry_run:
        text += " (dry run)"
    return f"{text}: {operation.error}" if operation.error else text


def audit_table(records: Sequence[rpb.AuditRecord]) -> Table:
    """Audit records, newest first as the registry returns them."""
    table = Table(title="Audit log")
    for column in ("id", "when (UTC)", "who", "action", "model", "version", "reason", "details"):
        table.add_column(column)
    for record in records:
        details = ", ".join(f"{k}={v}" for k, v in sorted(record.details.items()))
        table.add_row(
            str(record.id),
            when(record.at),
            escape(record.identity),
            escape(record.action),
            escape(record.model_name),
            str(record.version or "-"),
            escape(record.reason),
            escape(details),
        )
    return table


def apply_lines(response: pb.ApplyDeploymentResponse, dry_run: bool) -> list[str]:
    """What applying one model's deployment did (or would do): the outcome, the message and each change."""
    outcome = enum_name(pb.ApplyOutcome, response.outcome, "APPLY_OUTCOME_")
    deployment = response.deployment
    verb = "would be" if dry_run else "is"
    head = (
        f"{deployment.model_name}: {outcome} ({verb} generation {deployment.generation}, serving v{deployment.version})"
    )
    lines = [f"{head}: {response.message}" if response.message else head]
    lines += [f"  {change}" for change in response.changes]
    if response.HasField("rollout") and response.rollout.rollout_id:
        lines.append(f"  rollout {response.rollout.rollout_id}: {rollout_summary(response.rollout)}")
    return lines
