"""How the CLI shows rollouts, promotions, deployments and the audit log, on real proto messages."""

from __future__ import annotations

import io

from google.protobuf import duration_pb2, timestamp_pb2
from rich.console import Console, RenderableType

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.api.models.v1 import rollout_pb2 as ro
from fresco.rollout_view import (
    ACTIVE,
    EXIT_CODES,
    apply_lines,
    audit_table,
    decision_text,
    duration_text,
    event_lines,
    gate_text,
    operation_text,
    rollout_summary,
    rollout_view,
    state_name,
    step_text,
    strategy_text,
    traffic_text,
)

T0 = 1_790_000_000  # 2026-09-21 14:13:20 UTC


def at(offset: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=T0 + offset)


def text(renderable: RenderableType) -> str:
    console = Console(file=io.StringIO(), width=200, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def failed_error_rate() -> ro.AnalysisResult:
    return ro.AnalysisResult(
        check=ro.ANALYSIS_CHECK_ERROR_RATE,
        version=3,
        measured_value=0.21,
        baseline_value=0.001,
        threshold=0.05,
        passed=False,
        verdict=ro.ANALYSIS_VERDICT_FAILED,
        sample_count=812,
        baseline_sample_count=7300,
        min_samples=100,
        step_index=0,
        window_start=at(0),
        window_end=at(30),
        detail="server errors beyond the limit",
    )


def canary() -> ro.RolloutStrategy:
    return ro.RolloutStrategy(
        canary=ro.CanaryStrategy(
            steps=[
                ro.CanaryStep(traffic_percent=10, duration=duration_pb2.Duration(seconds=30)),
                ro.CanaryStep(traffic_percent=50, duration=duration_pb2.Duration(seconds=60), mirror_percent=5),
            ]
        )
    )


def rolled_back() -> ro.Rollout:
    decision = failed_error_rate()
    samples = ro.AnalysisResult(
        check=ro.ANALYSIS_CHECK_SAMPLES,
        version=3,
        measured_value=812,
        threshold=100,
        passed=True,
        verdict=ro.ANALYSIS_VERDICT_PASSED,
        sample_count=812,
        window_start=at(0),
        window_end=at(30),
    )
    return ro.Rollout(
        rollout_id="r-42",
        model_name="demo",
        version=3,
        baseline_version=2,
        strategy=canary(),
        state=ro.ROLLOUT_STATE_ROLLED_BACK,
        current_step_index=0,
        step_count=2,
        traffic=[ro.VersionTraffic(version=3, traffic_percent=0), ro.VersionTraffic(version=2, traffic_percent=100)],
        analysis_results=[decision, samples],
        message="rolled back at generation 4: error_rate 0.21 > 0.05 (n=812)",
        generation=4,
        attempt=1,
        published_revision=17,
        applied_revision=17,
        events=[
            ro.RolloutEvent(time=at(-60), type=ro.ROLLOUT_EVENT_TYPE_CREATED, state=ro.ROLLOUT_STATE_PENDING),
            ro.RolloutEvent(
                time=at(-30),
                type=ro.ROLLOUT_EVENT_TYPE_TRAFFIC_SHIFTED,
                state=ro.ROLLOUT_STATE_PROGRESSING,
                reason="step 1: 10%",
            ),
            ro.RolloutEvent(
                time=at(31),
                type=ro.ROLLOUT_EVENT_TYPE_ROLLED_BACK,
                state=ro.ROLLOUT_STATE_ROLLED_BACK,
                reason="error_rate 0.21 > 0.05",
                decisions=[decision],
            ),
        ],
    )


def test_a_decision_carries_metric_value_threshold_samples_and_window() -> None:
    assert decision_text(failed_error_rate()) == (
        "FAILED v3 error_rate 0.21 > 0.05 (n=812, baseline 0.001 n=7300, min 100) "
        "window 14:13:20–14:13:50 step 1: server errors beyond the limit"
    )
    passed = ro.AnalysisResult(
        check=ro.ANALYSIS_CHECK_LATENCY_P99,
        version=2,
        measured_value=12.5,
        threshold=50,
        verdict=ro.ANALYSIS_VERDICT_PASSED,
    )
    assert decision_text(passed).startswith("PASSED v2 latency_p99 12.5 <= 50 (n=0) window -–- step 1")


def test_too_few_samples_shows_the_counts() -> None:
    held = ro.AnalysisResult(
        check=ro.ANALYSIS_CHECK_SAMPLES,
        version=3,
        measured_value=37,
        threshold=500,
        verdict=ro.ANALYSIS_VERDICT_INCONCLUSIVE,
        sample_count=37,
        min_samples=500,
        step_index=1,
        detail="37/500 samples after 30m",
    )
    assert (
        decision_text(held)
        == "INCONCLUSIVE v3 samples 37/500 (n=37, min 500) window -–- step 2: 37/500 samples after 30m"
    )
    inconclusive = ro.AnalysisResult(
        check=ro.ANALYSIS_CHECK_ERROR_RATE,
        measured_value=0.02,
        threshold=0.05,
        verdict=ro.ANALYSIS_VERDICT_INCONCLUSIVE,
    )
    assert "error_rate 0.02 vs 0.05" in decision_text(inconclusive)  # neither within nor beyond: no comparison shown


def test_strategy_step_and_traffic() -> None:
    rollout = rolled_back()
    assert strategy_text(rollout.strategy) == "canary 10% → 50% → 100%"
    assert step_text(rollout) == "step 1/2 at 10%"
    assert traffic_text(rollout) == "v2 100% · v3 0%"
    rollout.current_step_index = 1
    rollout.traffic[0].traffic_percent, rollout.traffic[0].mirror_percent = 50, 5
    rollout.traffic[1].traffic_percent = 50
    assert (step_text(rollout), traffic_text(rollout)) == ("step 2/2 at 50%", "v2 50% · v3 50% (+5% mirrored)")
    assert "steps       █░ 1/2 done" in text(rollout_view(rollout)).splitlines()[3]
    rollout.state = ro.ROLLOUT_STATE_SUCCEEDED
    assert "steps       ██ 2/2 done" in text(rollout_view(rollout)).splitlines()[3]
    blue = ro.RolloutStrategy(blue_green=ro.BlueGreenStrategy(keep_previous_for=duration_pb2.Duration(seconds=5400)))
    assert strategy_text(blue) == "blue-green, previous kept 1h30m"
    blue.blue_green.warmup.FromSeconds(300)
    blue.blue_green.manual_switch = True
    assert strategy_text(blue) == "blue-green, warm-up 5m, manual switch, previous kept 1h30m"
    counted = ro.RolloutStrategy(canary=ro.CanaryStrategy(steps=[ro.CanaryStep(traffic_percent=10, min_samples=500)]))
    assert strategy_text(counted) == "canary 10% (n≥500) → 100%"
    assert strategy_text(ro.RolloutStrategy(shadow=ro.ShadowStrategy(mirror_percent=20))) == "shadow, 20% mirrored"
    assert step_text(ro.Rollout(strategy=blue)) == ""
    assert traffic_text(ro.Rollout()) == "no traffic"


def test_durations() -> None:
    assert [
        duration_text(duration_pb2.Duration(seconds=s, nanos=n))
        for s, n in ((0, 0), (0, 500_000_000), (45, 0), (300, 0), (3661, 0), (14 * 86400, 0), (90061, 0))
    ] == [
        "0s",
        "500ms",
        "45s",
        "5m",
        "1h1m1s",
        "14d",
        "1d1h1m1s",
    ]


def test_the_live_view_shows_state_verdict_decisions_and_last_events() -> None:
    shown = text(rollout_view(rolled_back(), recent_events=2))
    lines = [line.rstrip() for line in shown.splitlines()]
    assert "rollout     r-42 · demo v3" in lines
    assert "strategy    canary 10% → 50% → 100%" in lines
    assert "state       ROLLED_BACK · step 1/2 at 10%" in lines
    assert "traffic     v2 100% · v3 0%" in lines
    assert "steps       ░░ 0/2 done" in lines  # the canary's progress: no step completed before the rollback
    assert "routes      published 17, applied by the gateways 17" in lines
    assert "message     rolled back at generation 4: error_rate 0.21 > 0.05 (n=812)" in lines
    assert "  " + decision_text(failed_error_rate()) in lines
    assert any(line.startswith("  PASSED v3 samples 812/100") for line in lines)
    events = lines[lines.index("events") + 1 :]
    assert [line for line in events if line] == [
        "  14:12:50 TRAFFIC_SHIFTED → PROGRESSING at step 1: step 1: 10%",
        "  14:13:51 ROLLED_BACK → ROLLED_BACK at step 1: error_rate 0.21 > 0.05",
    ]


def test_an_xds_nack_shows_in_the_view() -> None:
    rollout = rolled_back()
    rollout.xds_nacks.add(node_id="envoy-1", type_url="RouteConfiguration", version_info="18", error="bad weights")
    assert "xDS NACK from envoy-1 (RouteConfiguration 18): bad weights" in text(rollout_view(rollout))


def test_events_list_the_decisions_behind_them() -> None:
    event = rolled_back().events[-1]
    event.actor = "alice"
    assert event_lines(event) == [
        "14:13:51 ROLLED_BACK → ROLLED_BACK at step 1: error_rate 0.21 > 0.05 (by alice)",
        "    " + decision_text(failed_error_rate()),
    ]


def test_states_unknown_to_this_client_still_show() -> None:
    assert state_name(ro.ROLLOUT_STATE_ROLLED_BACK) == "ROLLED_BACK"
    assert state_name(99) == "99"  # open enums: a newer server's value
    assert EXIT_CODES[ro.ROLLOUT_STATE_SUCCEEDED] == 0
    assert all(EXIT_CODES[s] != 0 for s in (ro.ROLLOUT_STATE_ROLLED_BACK, ro.ROLLOUT_STATE_FAILED))
    assert not ACTIVE & EXIT_CODES.keys()  # a watch ends exactly on the states that are not active


def test_summary_line() -> None:
    assert rollout_summary(rolled_back()) == "demo v3 (baseline v2): ROLLED_BACK, step 1/2 at 10%, v2 100% · v3 0%"


def test_gate_results_and_operations() -> None:
    passed = rpb.GateResult(
        name="backtest.auc", passed=True, measured_value=0.9838, threshold=0.9, detail="on 1000 rows"
    )
    failed = rpb.GateResult(name="latency.p99", passed=False, measured_value=31.25, threshold=20)
    assert gate_text(passed) == "PASS backtest.auc: 0.9838 vs threshold 0.9 (on 1000 rows)"
    assert gate_text(failed) == "FAIL latency.p99: 31.25 vs threshold 20"
    operation = rpb.Operation(
        kind="promote",
        model_name="demo",
        version=2,
        target_stage=rpb.MODEL_STAGE_PRODUCTION,
        state=rpb.OPERATION_STATE_FAILED,
        stage=rpb.MODEL_STAGE_REJECTED,
        error="latency.p99 31.25 > 20",
    )
    assert operation_text(operation) == "promote demo v2 to production: FAILED, stage rejected: latency.p99 31.25 > 20"
    operation.state, operation.stage, operation.forced, operation.error = (
        rpb.OPERATION_STATE_SUCCEEDED,
        rpb.MODEL_STAGE_PRODUCTION,
        True,
        "",
    )
    assert (
        operation_text(operation)
        == "promote demo v2 to production: SUCCEEDED, stage production (forced over failed gates)"
    )


def test_the_audit_table() -> None:
    records = [
        rpb.AuditRecord(
            id=7,
            at=at(0),
            identity="deployer-token",
            action="version.stage",
            model_name="demo",
            version=2,
            reason="gates passed",
            details={"to": "production", "from": "candidate"},
        ),
        rpb.AuditRecord(id=6, at=at(-5), identity="anonymous", action="model.create", model_name="demo"),
    ]
    shown = text(audit_table(records))
    row = next(line for line in shown.splitlines() if "version.stage" in line)
    for cell in ("7", "2026-09-21 14:13:20", "deployer-token", "demo", "gates passed", "from=candidate, to=production"):
        assert cell in row
    other = next(line for line in shown.splitlines() if "model.create" in line)
    assert "│ -" in other  # no version


def test_apply_lines() -> None:
    response = pb.ApplyDeploymentResponse(
        deployment=pb.Deployment(model_name="demo", version=3, generation=4),
        outcome=pb.APPLY_OUTCOME_HELD,
        message="rolled back at generation 4: error_rate 0.21 > 0.05 (n=812)",
        changes=[],
        rollout=rolled_back(),
    )
    assert apply_lines(response, dry_run=False) == [
        "demo: HELD (is generation 4, serving v3): rolled back at generation 4: error_rate 0.21 > 0.05 (n=812)",
        "  rollout r-42: demo v3 (baseline v2): ROLLED_BACK, step 1/2 at 10%, v2 100% · v3 0%",
    ]
    planned = pb.ApplyDeploymentResponse(
        deployment=pb.Deployment(model_name="demo", version=3, generation=5),
        outcome=pb.APPLY_OUTCOME_UPDATED,
        changes=["version: 2 → 3", "strategy: blue-green → canary"],
    )
    assert apply_lines(planned, dry_run=True) == [
        "demo: UPDATED (would be generation 5, serving v3)",
        "  version: 2 → 3",
        "  strategy: blue-green → canary",
    ]


def test_only_a_canary_shows_a_step_bar() -> None:
    blue = rolled_back()
    blue.strategy.CopyFrom(ro.RolloutStrategy(blue_green=ro.BlueGreenStrategy()))
    blue.step_count = 0
    lines = text(rollout_view(blue)).splitlines()
    assert not any(line.startswith("steps") for line in lines)
    assert any(line.startswith("state       ROLLED_BACK") for line in lines)


def test_the_full_traffic_phase_after_the_steps_says_full() -> None:
    rollout = rolled_back()
    rollout.current_step_index = 2  # the phase after the last of the 2 steps
    rollout.state = ro.ROLLOUT_STATE_PROGRESSING
    assert step_text(rollout) == "full"
    assert "state       PROGRESSING · full" in [line.rstrip() for line in text(rollout_view(rollout)).splitlines()]
    assert "step 3/2" not in rollout_summary(rollout)
    rollout.state = ro.ROLLOUT_STATE_SUCCEEDED
    assert rollout_summary(rollout).startswith("demo v3 (baseline v2): SUCCEEDED, full, ")


def test_a_decision_without_a_baseline_shows_none() -> None:
    alone = failed_error_rate()
    alone.baseline_value, alone.baseline_sample_count = 0.0, 0
    assert decision_text(alone).startswith("FAILED v3 error_rate 0.21 > 0.05 (n=812, min 100) window")
    assert "baseline" not in decision_text(alone)
    assert "baseline 0.001 n=7300" in decision_text(failed_error_rate())


def test_a_check_without_a_measure_shows_only_its_detail() -> None:
    schema = rpb.GateResult(
        name="schema.artifact", type=rpb.GATE_TYPE_SCHEMA, passed=True, detail="loads; 1 inputs match the signature"
    )
    assert gate_text(schema) == "PASS schema.artifact: loads; 1 inputs match the signature"
    bare = rpb.GateResult(name="schema.features", passed=False, detail="feature f9 is in no view")
    assert gate_text(bare) == "FAIL schema.features: feature f9 is in no view"
    assert gate_text(rpb.GateResult(name="schema.x", passed=True)) == "PASS schema.x: passed"
    zero_threshold = rpb.GateResult(name="backtest.dataset", type=rpb.GATE_TYPE_BACKTEST, measured_value=1000)
    assert gate_text(zero_threshold) == "FAIL backtest.dataset: 1000 vs threshold 0"


def test_the_view_shows_the_gates_a_rollout_waited_for() -> None:
    rollout = rolled_back()
    rollout.gate_operation_id = "op-7"
    rollout.gate_results.add(name="backtest.auc.min_value", type=rpb.GATE_TYPE_BACKTEST, measured_value=0.61,
                             threshold=0.8, detail="auc 0.61 < 0.8")  # fmt: skip
    lines = [line.rstrip() for line in text(rollout_view(rollout)).splitlines()]
    assert "gates       operation op-7" in lines
    assert "  FAIL backtest.auc.min_value: 0.61 vs threshold 0.8 (auc 0.61 < 0.8)" in lines
