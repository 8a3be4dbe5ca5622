"""The rollout state machine's gates before traffic, per-step sample minimums, blue-green warm-up and manual switch,
rollback on an unhealthy version, event types and the event marks a resumed watch reads."""

from __future__ import annotations

import math

import pytest

from fresco.api.models.v1 import rollout_pb2 as rpb
from model_manager.actions import Do, Pause, State
from model_manager.analysis import AnalysisSpec, Check, Decision, Verdict
from model_manager.controller import Entry
from model_manager.plans import CanaryStep, RolloutSpec, Strategy
from model_manager.rollout import EVENT_KINDS, Rollout, RolloutError
from model_manager.rollout_messages import EVENT_TYPES, analysis_result, event_messages
from model_manager.rollout_store import StoredRollout
from tests.model_manager.rollout_driver import FakeClock, started


def state(r: Rollout) -> State:
    """The state, read through a call so the type checker does not pin it between verbs."""
    return r.state


def canary(**kw: object) -> RolloutSpec:
    args: dict[str, object] = {
        "model": "churn",
        "version": 2,
        "baseline": 1,
        "strategy": Strategy.CANARY,
        "steps": (CanaryStep(10.0, dwell=60.0), CanaryStep(50.0, dwell=60.0)),
        "analysis": AnalysisSpec(min_samples=100, max_error_rate=0.01),
    }
    return RolloutSpec(**(args | kw))  # type: ignore[arg-type]


def blue_green(**kw: object) -> RolloutSpec:
    args: dict[str, object] = {
        "model": "churn",
        "version": 2,
        "baseline": 1,
        "strategy": Strategy.BLUE_GREEN,
        "keep_previous_for": 600.0,
    }
    return RolloutSpec(**(args | kw))  # type: ignore[arg-type]


# --- event types --------------------------------------------------------------------------------------------


def test_every_event_kind_the_rollout_records_has_a_contract_event_type() -> None:
    assert set(EVENT_TYPES) == EVENT_KINDS
    assert all(value != rpb.ROLLOUT_EVENT_TYPE_UNSPECIFIED for value in EVENT_TYPES.values())
    assert all(rpb.RolloutEventType.Name(value) for value in EVENT_TYPES.values())  # values the contract defines


def test_a_rollout_records_only_kinds_it_declares_and_each_shows_typed() -> None:
    clock = FakeClock()
    c = started(canary(), clock)
    r = c.rollout
    r.await_gates("op-1")
    r.gates_done(True, "gates passed", [])
    c.run(until=Do.ANALYSE)
    c.verdict = Verdict.FAILED
    c.run()
    r.retry("alice", "fixed")
    c.verdict = Verdict.PASSED
    c.run(until=Do.AWAIT_ACK)
    r.pause("alice", "look")
    r.resume("alice", "go")
    r.promote("alice", "enough", full=True)
    c.run()
    kinds = {e.kind for e in r.events}
    assert {"applied", "rollback_started", "promoted", "retried", "gates_started", "gates_passed"} <= kinds
    assert kinds <= EVENT_KINDS
    assert all(m.type != rpb.ROLLOUT_EVENT_TYPE_UNSPECIFIED for m in event_messages(r))
    assert [m.reason for m in event_messages(r)] == [e.reason for e in r.events]  # no kind name stuffed in reasons


# --- promotion gates before traffic -------------------------------------------------------------------------


def test_a_gated_rollout_loads_and_serves_nothing_until_its_gates_pass() -> None:
    clock = FakeClock()
    c = started(canary(), clock)
    r = c.rollout
    r.await_gates("op-1")
    assert (r.gates, r.gate_operation) == ("running", "op-1")
    assert r.route().weights == {1: 100.0}, "only the baseline is wanted while the gates run"
    assert r.poll().do is Do.WAIT
    assert "op-1" in r.message
    assert r.gates_done(True, "promotion gates passed, operation op-1", [{"name": "schema.artifact"}])
    assert not r.gates_done(True, "again", []), "a second report is ignored"
    assert r.gate_results == ({"name": "schema.artifact"},)
    assert r.poll().do is Do.LOAD
    c.run()
    assert state(r) is State.SUCCEEDED


def test_failed_gates_fail_the_rollout_with_the_results_and_retry_goes_on_once_forced() -> None:
    clock = FakeClock()
    c = started(canary(), clock)
    r = c.rollout
    r.await_gates("op-1")
    results = [{"name": "backtest.auc.min_value", "passed": False, "detail": "auc 0.61 < 0.80"}]
    r.gates_done(False, "gates failed: backtest.auc.min_value: auc 0.61 < 0.80 (operation op-1)", results)
    assert state(r) is State.FAILED
    assert r.events[-1].kind == "gates_failed"
    assert "auc 0.61 < 0.80" in r.message
    assert r.gate_results == tuple(results)
    assert r.route().weights == {1: 100.0}
    assert c.run().do is Do.NOTHING
    assert not any(a.do is Do.LOAD for a in c.done), "nothing of the version was loaded"
    r.retry("alice", "forced through", gate_operation="")  # the version passed since (a forced promotion)
    assert r.gates == "passed"
    c.run()
    assert state(r) is State.SUCCEEDED


def test_retry_after_gates_that_did_not_run_runs_them_again() -> None:
    clock = FakeClock()
    c = started(canary(), clock)
    r = c.rollout
    r.await_gates("op-1")
    r.gates_done(False, "promotion gates did not run to the end: manager restarted", [])
    r.retry("alice", "again", gate_operation="op-2")
    assert (r.gates, r.gate_operation, r.poll().do) == ("running", "op-2", Do.WAIT)


# --- per-step sample minimums -------------------------------------------------------------------------------


def test_a_step_with_min_samples_is_judged_with_its_raised_guard() -> None:
    clock = FakeClock()
    spec = canary(steps=(CanaryStep(10.0, dwell=60.0, min_samples=500), CanaryStep(50.0, dwell=60.0)))
    c = started(spec, clock)
    first = c.run(until=Do.ANALYSE)
    assert first.analysis is not None
    assert first.analysis.min_samples == 500
    assert first.analysis.max_error_rate == 0.01
    c.run(until=Do.PUBLISH)
    second = c.run(until=Do.ANALYSE)
    assert second.analysis is not None
    assert second.analysis.min_samples == 100


def test_a_step_with_min_samples_and_no_thresholds_is_still_counted() -> None:
    clock = FakeClock()
    c = started(canary(analysis=None, steps=(CanaryStep(10.0, min_samples=300), CanaryStep(50.0))), clock)
    c.verdict = Verdict.INCONCLUSIVE
    a = c.run(until=Do.ANALYSE)
    assert a.analysis == AnalysisSpec(min_samples=300)
    for _ in range(5):
        c.step()
    assert c.rollout.phase == 0, "too few samples hold the step"
    c.verdict = Verdict.PASSED
    c.run(until=Do.PUBLISH)
    assert c.rollout.phase == 1
    assert c.run().do is Do.NOTHING, "the steps without a minimum are not judged"
    assert state(c.rollout) is State.SUCCEEDED


# --- blue-green warm-up and manual switch -------------------------------------------------------------------


def test_blue_green_stays_on_the_old_version_for_its_warmup_then_switches() -> None:
    clock = FakeClock()
    c = started(blue_green(warmup=120.0), clock)
    r = c.rollout
    assert r.poll().do is Do.LOAD
    r.loaded_version(2)
    loaded_at = clock.now
    a = r.poll()
    assert (a.do, a.until) == (Do.WAIT, loaded_at + 120.0)
    assert r.route().weights == {1: 100.0}
    assert "warming up" in r.message
    clock.advance(119.0)
    assert r.poll().do is Do.WAIT
    clock.advance(1.0)
    assert r.poll().do is Do.PUBLISH
    c.run(until=Do.AWAIT_ACK)
    assert c.published[0][1] == {2: 100.0}


def test_a_manual_switch_pauses_warm_until_resume_and_promote_switches_too() -> None:
    clock = FakeClock()
    c = started(blue_green(manual_switch=True), clock)
    r = c.rollout
    assert c.run().do is Do.PAUSED
    assert state(r) is State.PAUSED
    assert r.to_dict()["pause"] == Pause.SWITCH_GATE.value
    assert r.loaded == {1, 2}
    assert c.published == [], "no switch before a person says so"
    r.resume("alice", "dashboards fine")
    c.run(until=Do.AWAIT_ACK)
    assert c.published[0][1] == {2: 100.0}

    other = started(blue_green(manual_switch=True), FakeClock())
    other.run()
    other.rollout.promote("alice", "now")
    assert state(other.rollout) is State.PROGRESSING
    other.run(until=Do.AWAIT_ACK)
    assert other.published[0][1] == {2: 100.0}, "promote switches, it does not skip the keep-warm phase"


def test_warmup_and_manual_switch_belong_to_blue_green_only() -> None:
    with pytest.raises(ValueError, match="warmup"):
        canary(warmup=10.0)
    with pytest.raises(ValueError, match="warmup"):
        blue_green(warmup=-1.0)


# --- rollback on an unhealthy version -----------------------------------------------------------------------


def test_no_healthy_endpoint_for_longer_than_the_grace_rolls_back() -> None:
    clock = FakeClock()
    c = started(canary(on_unhealthy=True, unhealthy_grace=30.0), clock)
    r = c.rollout
    assert not r.health(False), "before any traffic it is not watched"
    c.run(until=Do.ANALYSE)
    assert r.health(False)
    assert r.unhealthy_deadline == clock.now + 30.0
    clock.advance(29.0)
    assert not r.health(False)
    assert r.health(True), "healthy again: the grace starts over"
    assert r.unhealthy_deadline is None
    r.health(False)
    clock.advance(30.0)
    assert r.health(False)
    assert state(r) is State.ROLLING_BACK
    assert [e.kind for e in r.events[-2:]] == ["unhealthy", "rollback_started"]
    assert "no healthy endpoint for 30 s" in r.message
    c.run()
    assert state(r) is State.ROLLED_BACK


def test_unhealthy_without_the_policy_or_a_baseline() -> None:
    clock = FakeClock()
    c = started(canary(), clock)
    c.run(until=Do.ANALYSE)
    assert not c.rollout.health(False), "on_unhealthy off: ignored"
    first = started(blue_green(baseline=None, on_unhealthy=True, unhealthy_grace=5.0), clock)
    first.run(until=Do.WAIT)
    first.rollout.health(False)
    clock.advance(5.0)
    first.rollout.health(False)
    assert state(first.rollout) is State.PAUSED, "nothing to roll back to: a person decides"
    with pytest.raises(RolloutError):
        first.rollout.retry("alice", "no")


# --- event marks ------------------------------------------------------------------------------------------------


def test_event_marks_say_how_many_events_each_revision_stored() -> None:
    clock = FakeClock()
    r = Rollout.start("r-1", canary(), 1, clock)
    stored = StoredRollout({**r.to_dict(), "event_marks": [[1, 1], [4, 3], [6, 7]]}, 6, "alice", "", {})
    entry = Entry.of(stored, clock)
    assert [entry.events_at(n) for n in (0, 1, 3, 4, 5, 6, 9)] == [0, 1, 1, 3, 3, 7, 7]
    assert entry.snapshot(clock).marks == entry.marks == [(1, 1), (4, 3), (6, 7)]
    legacy = Entry.of(StoredRollout(r.to_dict(), 2, "", "", {}), clock)
    assert legacy.marks == []
    assert legacy.events_at(2) == 0


def test_a_decision_without_a_baseline_carries_zero_never_nan() -> None:
    alone = Decision(Check.ERROR_RATE, Verdict.PASSED, 0.01, 0.05, 812, 100, 1.0, 31.0)
    message = analysis_result(alone, 2, 0)
    assert (message.baseline_value, message.baseline_sample_count) == (0.0, 0)
    assert not math.isnan(message.baseline_value)
    shared = Decision(Check.ERROR_RATIO, Verdict.PASSED, 0.01, 2.0, 812, 100, 1.0, 31.0, 0.02, 7300)
    assert (analysis_result(shared, 2, 0).baseline_value, analysis_result(shared, 2, 0).baseline_sample_count) == (
        0.02,
        7300,
    )
