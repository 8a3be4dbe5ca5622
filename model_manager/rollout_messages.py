"""Between rollout specs and status and the fresco.models.v1 rollout messages: one place for each conversion."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from chassis.errors import InvalidArgument
from fresco.api.models.v1 import rollout_pb2 as rpb
from fresco.api.models.v1.registry_pb2 import GateResult
from model_manager.actions import State
from model_manager.analysis import AnalysisSpec, Check, Decision, Verdict
from model_manager.plans import CanaryStep, RolloutSpec, Strategy
from model_manager.rollout import Rollout
from model_manager.xds_stream import Nack

DEFAULT_MIN_SAMPLES = 100
DEFAULT_INCONCLUSIVE_LIMIT_S = 1800.0
DEFAULT_ANALYSIS_INTERVAL_S = 10.0

_CHECKS: dict[Check, rpb.AnalysisCheck.ValueType] = {
    Check.SAMPLES: rpb.ANALYSIS_CHECK_SAMPLES,
    Check.ERROR_RATE: rpb.ANALYSIS_CHECK_ERROR_RATE,
    Check.ERROR_RATIO: rpb.ANALYSIS_CHECK_ERROR_RATIO,
    Check.LATENCY_P99: rpb.ANALYSIS_CHECK_LATENCY_P99,
    Check.LATENCY_P99_RATIO: rpb.ANALYSIS_CHECK_LATENCY_P99_RATIO,
    Check.SCORE_PSI: rpb.ANALYSIS_CHECK_PREDICTION_PSI,
    Check.SHADOW_DISAGREEMENT: rpb.ANALYSIS_CHECK_SHADOW_DISAGREEMENT,
    Check.SHADOW_MEAN_ABS_DIFF: rpb.ANALYSIS_CHECK_MEAN_ABS_SCORE_DIFF,
    Check.FEATURE_DRIFT: rpb.ANALYSIS_CHECK_FEATURE_DRIFT,
}
_VERDICTS: dict[Verdict, rpb.AnalysisVerdict.ValueType] = {
    Verdict.PASSED: rpb.ANALYSIS_VERDICT_PASSED,
    Verdict.FAILED: rpb.ANALYSIS_VERDICT_FAILED,
    Verdict.INCONCLUSIVE: rpb.ANALYSIS_VERDICT_INCONCLUSIVE,
    Verdict.ERROR: rpb.ANALYSIS_VERDICT_ERROR,
}
_STATES: dict[State, rpb.RolloutState.ValueType] = {
    State.PENDING: rpb.ROLLOUT_STATE_PENDING,
    State.PROGRESSING: rpb.ROLLOUT_STATE_PROGRESSING,
    State.PAUSED: rpb.ROLLOUT_STATE_PAUSED,
    State.ROLLING_BACK: rpb.ROLLOUT_STATE_ROLLING_BACK,
    State.SUCCEEDED: rpb.ROLLOUT_STATE_SUCCEEDED,
    State.ROLLED_BACK: rpb.ROLLOUT_STATE_ROLLED_BACK,
    State.FAILED: rpb.ROLLOUT_STATE_FAILED,
    State.ABORTED: rpb.ROLLOUT_STATE_ABORTED,
}
_STATE_OF = {v: k for k, v in _STATES.items()}
# Every event kind the rollout records (rollout.EVENT_KINDS), as the contract's event type.
EVENT_TYPES: dict[str, rpb.RolloutEventType.ValueType] = {
    "created": rpb.ROLLOUT_EVENT_TYPE_CREATED,
    "gates_started": rpb.ROLLOUT_EVENT_TYPE_GATES_STARTED,
    "gates_passed": rpb.ROLLOUT_EVENT_TYPE_GATES_PASSED,
    "gates_failed": rpb.ROLLOUT_EVENT_TYPE_GATES_FAILED,
    "loaded": rpb.ROLLOUT_EVENT_TYPE_VERSION_READY,
    "load_failed": rpb.ROLLOUT_EVENT_TYPE_LOAD_FAILED,
    "published": rpb.ROLLOUT_EVENT_TYPE_TRAFFIC_SHIFTED,
    "applied": rpb.ROLLOUT_EVENT_TYPE_APPLIED,
    "phase_completed": rpb.ROLLOUT_EVENT_TYPE_STEP_COMPLETED,
    "analysis_failed": rpb.ROLLOUT_EVENT_TYPE_ANALYSIS_FAILED,
    "unhealthy": rpb.ROLLOUT_EVENT_TYPE_UNHEALTHY,
    "paused": rpb.ROLLOUT_EVENT_TYPE_PAUSED,
    "resumed": rpb.ROLLOUT_EVENT_TYPE_RESUMED,
    "promoted": rpb.ROLLOUT_EVENT_TYPE_PROMOTED,
    "rollback_started": rpb.ROLLOUT_EVENT_TYPE_ROLLBACK_STARTED,
    "rolled_back": rpb.ROLLOUT_EVENT_TYPE_ROLLED_BACK,
    "succeeded": rpb.ROLLOUT_EVENT_TYPE_SUCCEEDED,
    "retried": rpb.ROLLOUT_EVENT_TYPE_RETRIED,
    "superseded": rpb.ROLLOUT_EVENT_TYPE_SUPERSEDED,
}
DEFAULT_UNHEALTHY_GRACE_S = 30.0


# The optional limits of AnalysisSpec and the AnalysisThresholds fields that carry them.
_OPTIONAL_LIMITS = (
    ("max_error_rate", "max_error_rate"),
    ("max_error_ratio", "max_error_ratio"),
    ("max_latency_p99_ms", "max_latency_p99_ms"),
    ("max_latency_p99_ratio", "max_latency_p99_ratio"),
    ("max_score_psi", "max_prediction_psi"),
    ("max_shadow_disagreement", "max_shadow_disagreement"),
    ("max_mean_abs_score_diff", "max_mean_abs_score_diff"),
    ("max_feature_psi", "max_feature_psi"),
)


def state_value(state: State) -> rpb.RolloutState.ValueType:
    """A rollout state as its RolloutState number."""
    return _STATES[state]


def state_of(field: str, value: int) -> State:
    """A RolloutState number as a state; INVALID_ARGUMENT for unset or unknown numbers."""
    state: State | None = _STATE_OF.get(value)  # type: ignore[call-overload]
    if state is None:
        raise InvalidArgument(f"{field}: expected a RolloutState other than UNSPECIFIED, got {value}")
    return state


def _timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def _seconds(field: str, d: Duration, default: float) -> float:
    if d.seconds == 0 and d.nanos == 0:
        return default
    value = d.ToNanoseconds() / 1e9
    if value < 0:
        raise InvalidArgument(f"{field}: expected a non-negative duration")
    return value


# --- spec from messages -----------------------------------------------------------------------------------


def _analysis(field: str, t: rpb.AnalysisThresholds, min_samples: int = 0) -> tuple[AnalysisSpec, float]:
    if t.HasField("max_score_mean_shift"):
        raise InvalidArgument(f"{field}.max_score_mean_shift: not judged by this manager; use max_prediction_psi")
    if t.min_samples < 0:
        raise InvalidArgument(f"{field}.min_samples: expected a count of at least 0")
    opt = {
        name: getattr(t, proto) if t.HasField(proto) else None  # type: ignore[arg-type]
        for name, proto in _OPTIONAL_LIMITS
    }
    try:
        spec = AnalysisSpec(
            min_samples=t.min_samples or min_samples or DEFAULT_MIN_SAMPLES,
            alpha=t.alpha or 0.05,
            score_output=t.score_output,
            **opt,
        )
    except ValueError as err:
        raise InvalidArgument(f"{field}.{str(err).replace('max_score_psi', 'max_prediction_psi')}") from None
    limit = _seconds(f"{field}.inconclusive_limit", t.inconclusive_limit, DEFAULT_INCONCLUSIVE_LIMIT_S)
    return spec, limit


def rollout_spec(
    field: str,
    model: str,
    version: int,
    baseline: int | None,
    strategy: rpb.RolloutStrategy,
    auto_rollback: rpb.AutoRollbackPolicy | None,
) -> RolloutSpec:
    """The rollout a strategy message asks for; INVALID_ARGUMENT naming the field when it cannot be one."""
    kind = strategy.WhichOneof("kind")
    where = f"{field}.{kind}"
    args: dict[str, Any] = {}
    analysis: AnalysisSpec | None = None
    limit = DEFAULT_INCONCLUSIVE_LIMIT_S
    if kind == "blue_green":
        bg = strategy.blue_green
        if bg.warmup_requests:
            raise InvalidArgument(
                f"{where}.warmup_requests: not supported; a version is warm once loaded (its warm-up requests run "
                "at load), use warmup for a minimum time warm before the switch"
            )
        args.update(
            strategy=Strategy.BLUE_GREEN,
            keep_previous_for=_seconds(f"{where}.keep_previous_for", bg.keep_previous_for, 0.0),
            warmup=_seconds(f"{where}.warmup", bg.warmup, 0.0),
            manual_switch=bg.manual_switch,
        )
        if bg.HasField("analysis"):
            analysis, limit = _analysis(f"{where}.analysis", bg.analysis)
    elif kind == "canary":
        c = strategy.canary
        steps = []
        for i, s in enumerate(c.steps):
            if s.min_samples < 0:
                raise InvalidArgument(f"{where}.steps[{i}].min_samples: expected a count of at least 0")
            dwell = _seconds(f"{where}.steps[{i}].duration", s.duration, 0.0)
            steps.append(CanaryStep(s.traffic_percent, dwell, s.mirror_percent, s.pause, int(s.min_samples)))
        args.update(strategy=Strategy.CANARY, steps=tuple(steps))
        args["analysis_interval"] = _seconds(
            f"{where}.analysis_interval", c.analysis_interval, DEFAULT_ANALYSIS_INTERVAL_S
        )
        if c.HasField("analysis"):
            analysis, limit = _analysis(f"{where}.analysis", c.analysis)
    elif kind == "shadow":
        sh = strategy.shadow
        if sh.min_samples < 0:
            raise InvalidArgument(f"{where}.min_samples: expected a count of at least 0")
        args.update(
            strategy=Strategy.SHADOW,
            mirror_percent=sh.mirror_percent,
            shadow_duration=_seconds(f"{where}.duration", sh.duration, 0.0),
        )
        if sh.HasField("comparison"):
            analysis, limit = _analysis(f"{where}.comparison", sh.comparison, int(sh.min_samples))
    else:
        raise InvalidArgument(f"{field}: expected one of blue_green, canary or shadow")
    failure_limit, auto = 1, True
    if auto_rollback is not None:
        if auto_rollback.consecutive_failures < 0:
            raise InvalidArgument("auto_rollback.consecutive_failures: expected a count of at least 0")
        auto, failure_limit = auto_rollback.enabled, auto_rollback.consecutive_failures or 1
        grace = _seconds("auto_rollback.unhealthy_grace", auto_rollback.unhealthy_grace, DEFAULT_UNHEALTHY_GRACE_S)
        args.update(on_unhealthy=auto_rollback.on_unhealthy, unhealthy_grace=grace)
    try:
        return RolloutSpec(
            model=model,
            version=version,
            baseline=baseline,
            analysis=analysis,
            inconclusive_limit=limit,
            failure_limit=failure_limit,
            auto_rollback=auto,
            **args,
        )
    except ValueError as err:
        text = str(err)
        if text.startswith(("model", "version", "baseline")):
            raise InvalidArgument(text) from None
        if text.startswith("unhealthy_grace"):
            raise InvalidArgument(f"auto_rollback.{text}") from None
        raise InvalidArgument(f"{where}.{text}") from None


# --- spec to messages -------------------------------------------------------------------------------------


def _thresholds(a: AnalysisSpec, limit: float) -> rpb.AnalysisThresholds:
    t = rpb.AnalysisThresholds(
        score_output=a.score_output,
        min_samples=a.min_samples,
        alpha=a.alpha,
        inconclusive_limit=_duration(limit),
    )
    for name, proto in _OPTIONAL_LIMITS:
        value = getattr(a, name)
        if value is not None:
            setattr(t, proto, value)
    return t


def strategy_message(spec: RolloutSpec) -> rpb.RolloutStrategy:
    """A spec's strategy as the message it came from."""
    a = spec.analysis
    if spec.strategy is Strategy.BLUE_GREEN:
        bg = rpb.BlueGreenStrategy(
            keep_previous_for=_duration(spec.keep_previous_for),
            warmup=_duration(spec.warmup),
            manual_switch=spec.manual_switch,
        )
        if a is not None:
            bg.analysis.CopyFrom(_thresholds(a, spec.inconclusive_limit))
        return rpb.RolloutStrategy(blue_green=bg)
    if spec.strategy is Strategy.CANARY:
        c = rpb.CanaryStrategy(
            steps=[
                rpb.CanaryStep(
                    traffic_percent=s.weight,
                    duration=_duration(s.dwell),
                    pause=s.pause_after,
                    mirror_percent=s.mirror,
                    min_samples=s.min_samples,
                )
                for s in spec.steps
            ],
            analysis_interval=_duration(spec.analysis_interval),
        )
        if a is not None:
            c.analysis.CopyFrom(_thresholds(a, spec.inconclusive_limit))
        return rpb.RolloutStrategy(canary=c)
    sh = rpb.ShadowStrategy(mirror_percent=spec.mirror_percent, duration=_duration(spec.shadow_duration))
    if a is not None:
        sh.comparison.CopyFrom(_thresholds(a, spec.inconclusive_limit))
    return rpb.RolloutStrategy(shadow=sh)


def _float(value: float | None) -> float:
    return math.nan if value is None else float(value)


def analysis_result(decision: Decision, version: int, step: int) -> rpb.AnalysisResult:
    """One decision with its reason as data: metric, value, threshold, samples and window."""
    result = rpb.AnalysisResult(
        check=_CHECKS.get(decision.check, rpb.ANALYSIS_CHECK_UNSPECIFIED),
        version=version,
        measured_value=_float(decision.measured),
        baseline_value=0.0 if decision.baseline is None else float(decision.baseline),  # never NaN: 0 and n=0
        threshold=_float(decision.threshold),
        passed=decision.verdict is Verdict.PASSED,
        sample_count=decision.samples,
        step_index=step,
        detail=decision.detail,
        verdict=_VERDICTS[decision.verdict],
        baseline_sample_count=decision.baseline_samples or 0,
        min_samples=decision.min_samples,
    )
    start, end = _timestamp(decision.window_start), _timestamp(decision.window_end)
    if start is not None:
        result.window_start.CopyFrom(start)
    if end is not None:
        result.window_end.CopyFrom(end)
    return result


def gate_result(stored: Mapping[str, Any]) -> GateResult:
    """A gate result the rollout keeps (a GateResult's JSON form, its backtest report left out) as the message."""
    return json_format.ParseDict(dict(stored), GateResult(), ignore_unknown_fields=True)


def stored_gate_result(result: GateResult) -> dict[str, Any]:
    """A gate result as the rollout keeps it: JSON, without the full backtest report (in the operation)."""
    kept = GateResult()
    kept.CopyFrom(result)
    kept.ClearField("backtest")
    return json_format.MessageToDict(kept)


def event_messages(rollout: Rollout, start: int = 0) -> list[rpb.RolloutEvent]:
    """The rollout's events from index `start` on, oldest first."""
    out = []
    for e in rollout.events[start:]:
        kind = EVENT_TYPES.get(e.kind, rpb.ROLLOUT_EVENT_TYPE_UNSPECIFIED)
        reason = e.reason if kind != rpb.ROLLOUT_EVENT_TYPE_UNSPECIFIED else f"{e.kind}: {e.reason}"
        message = rpb.RolloutEvent(
            type=kind,
            state=_STATES[e.state],
            step_index=e.phase,
            reason=reason,
            actor=e.actor,
            decisions=[analysis_result(d, rollout.spec.version, e.phase) for d in e.decisions],
        )
        message.time.FromNanoseconds(int(e.at * 1e9))
        out.append(message)
    return out


def rollout_message(
    rollout: Rollout,
    revision: int,
    *,
    initiated_by: str = "",
    reason: str = "",
    labels: Mapping[str, str] | None = None,
    nacks: list[Nack] | None = None,
) -> rpb.Rollout:
    """A rollout's full status: traffic, every decision of its latest analysis, history and revisions."""
    spec, raw = rollout.spec, rollout.to_dict()
    route = rollout.route()
    versions = sorted(set(route.weights) | set(route.mirror), key=lambda v: (v != spec.baseline, v))
    last = rollout.last_analysis
    message = rpb.Rollout(
        rollout_id=rollout.rollout_id,
        model_name=spec.model,
        version=spec.version,
        baseline_version=spec.baseline or 0,
        strategy=strategy_message(spec),
        auto_rollback=rpb.AutoRollbackPolicy(
            enabled=spec.auto_rollback,
            consecutive_failures=spec.failure_limit,
            on_unhealthy=spec.on_unhealthy,
            unhealthy_grace=_duration(spec.unhealthy_grace),
        ),
        state=_STATES[rollout.state],
        current_step_index=rollout.phase if spec.strategy is Strategy.CANARY else 0,
        step_count=len(spec.steps),
        traffic=[
            rpb.VersionTraffic(
                version=v, traffic_percent=route.weights.get(v, 0.0), mirror_percent=route.mirror.get(v, 0.0)
            )
            for v in versions
        ],
        analysis_results=[]
        if last is None
        else [analysis_result(d, spec.version, rollout.phase) for d in last.decisions],
        events=event_messages(rollout),
        message=rollout.message,
        initiated_by=initiated_by,
        reason=reason,
        labels=dict(labels or {}),
        generation=rollout.generation,
        attempt=raw["attempt"],
        published_revision=raw["revision"] or 0,
        applied_revision=raw["applied_revision"] or 0,
        xds_nacks=[
            rpb.XdsNack(
                node_id=n.node_id,
                type_url=n.type_url,
                version_info=n.rejected_version,
                error=n.message,
                time=_timestamp(n.at),
            )
            for n in reversed(nacks or [])
        ],
        revision=revision,
        gate_operation_id=rollout.gate_operation,
        gate_results=[gate_result(r) for r in rollout.gate_results],
    )
    for name, seconds in (
        ("created_at", raw["created_at"]),
        ("updated_at", raw["updated_at"]),
        ("finished_at", raw["finished_at"]),
    ):
        stamp = _timestamp(seconds)
        if stamp is not None:
            getattr(message, name).CopyFrom(stamp)
    return message
