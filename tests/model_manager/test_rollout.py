"""The rollout state machine: strategies, acknowledged steps, analysis outcomes, verbs and persistence."""

from __future__ import annotations

import json

import pytest

from model_manager.actions import Do, State
from model_manager.analysis import AnalysisSpec, Verdict
from model_manager.plans import CanaryStep, RolloutSpec, Strategy, plan
from model_manager.rollout import Rollout, RolloutError
from tests.model_manager.rollout_driver import Controller, FakeClock, started, verdict_analysis

ANALYSIS = AnalysisSpec(min_samples=100, max_error_rate=0.01)


def state(r: Rollout) -> State:
    """The state, read through a call so the type checker does not pin it between verbs."""
    return r.state


def canary(**kw) -> RolloutSpec:
    args = {
        "model": "churn",
        "version": 2,
        "baseline": 1,
        "strategy": Strategy.CANARY,
        "steps": (CanaryStep(10.0, dwell=300.0), CanaryStep(50.0, dwell=300.0)),
        "analysis": ANALYSIS,
        "analysis_interval": 60.0,
        "inconclusive_limit": 1800.0,
    }
    return RolloutSpec(**(args | kw))


def blue_green(**kw) -> RolloutSpec:
    args = {"model": "churn", "version": 2, "baseline": 1, "strategy": Strategy.BLUE_GREEN, "keep_previous_for": 600.0}
    return RolloutSpec(**(args | kw))


def test_a_passing_canary_walks_its_steps_to_full_and_unloads_the_old_version():
    clock = FakeClock()
    c = started(canary(), clock)
    assert c.run().do is Do.NOTHING
    r = c.rollout
    assert state(r) is State.SUCCEEDED
    assert [(w, m) for _, w, m in c.published] == [
        ({2: 10.0, 1: 90.0}, {}),
        ({2: 50.0, 1: 50.0}, {}),
        ({2: 100.0}, {}),
    ]
    assert [a.version for a in c.done if a.do is Do.LOAD] == [2]
    assert [a.version for a in c.done if a.do is Do.UNLOAD] == [1]
    completed = [e for e in r.events if e.kind == "phase_completed"]
    assert len(completed) == 3
    assert all(e.decisions and all(d.verdict is Verdict.PASSED for d in e.decisions) for e in completed)
    assert r.loaded == {2}


def test_a_step_counts_only_from_the_acknowledgement_of_its_route_revision():
    clock = FakeClock()
    c = started(canary(), clock)
    c.run(until=Do.PUBLISH)
    assert c.step(ack=False).do is Do.AWAIT_ACK
    clock.advance(20)  # published, but not acknowledged: no analysis, no dwell
    a = c.rollout.poll()
    assert (a.do, a.revision) == (Do.AWAIT_ACK, 1)
    assert c.rollout.acknowledged(0) is False
    assert c.rollout.acknowledged(2) is True  # a later revision carries the same route
    assert c.rollout.events[-1].reason == "canary 10% acknowledged at route revision 1"
    a = c.rollout.poll()
    assert (a.do, a.revision, a.since, a.baseline) == (Do.ANALYSE, 1, clock.now, 1)


def test_an_unacknowledged_route_pauses_and_resume_publishes_it_again():
    clock = FakeClock()
    c = started(canary(ack_timeout=30.0), clock)
    c.run(until=Do.PUBLISH)
    first = next(a for a in c.done if a.do is Do.PUBLISH)
    clock.advance(30)
    a = c.rollout.poll()
    assert a.do is Do.PAUSED
    assert a.reason == "route revision 1 not acknowledged after 30 s"
    c.rollout.resume("ops@example.com", "gateways back")
    a = c.rollout.poll()
    assert a.do is Do.PUBLISH
    assert a.serial > first.serial
    assert c.rollout.published(first.serial, 99) is False  # a stale publish is ignored


def test_a_failed_analysis_rolls_back_with_its_reason_and_reports_the_generation():
    clock = FakeClock()
    c = started(canary(), clock, generation=7)
    c.verdict = Verdict.FAILED
    c.run(until=Do.ANALYSE)
    r = c.rollout
    assert state(r) is State.ROLLING_BACK
    rollback = next(e for e in r.events if e.kind == "rollback_started")
    assert rollback.actor == ""
    assert {d.check.value for d in rollback.decisions} == {"samples", "error_rate"}
    assert r.route().weights == {1: 100.0}
    assert c.run().do is Do.NOTHING
    assert state(r) is State.ROLLED_BACK
    assert r.message.startswith("rolled back at generation 7: FAILED: error rate 0.2000")
    assert c.published[-1][1:] == ({1: 100.0}, {})
    assert [a.version for a in c.done if a.do is Do.UNLOAD] == [2]
    assert r.status()["decisions"][1]["measured"] == 0.2


def test_an_inconclusive_step_holds_then_pauses_with_the_counts_and_never_rolls_back():
    clock = FakeClock()
    c = started(canary(), clock)
    c.verdict = Verdict.INCONCLUSIVE
    a = c.run()
    r = c.rollout
    assert a.do is Do.PAUSED
    assert state(r) is State.PAUSED
    assert r.message == "canary 10%: INCONCLUSIVE, 37/100 samples after 35 m"
    paused = r.events[-1]
    assert (paused.kind, paused.actor) == ("paused", "")
    assert [(d.check.value, d.samples, d.min_samples) for d in paused.decisions] == [("samples", 37, 100)]
    assert r.route().weights == {2: 10.0, 1: 90.0}
    assert not [e for e in r.events if e.kind == "rollback_started"]
    # Resuming holds again for a full limit, analysing all the while.
    r.resume("ops@example.com", "more traffic soon")
    assert r.poll().do is Do.ANALYSE
    c.verdict = Verdict.PASSED
    assert c.run().do is Do.NOTHING
    assert state(r) is State.SUCCEEDED


def test_a_pass_before_the_dwell_ends_does_not_complete_the_step_nor_an_inconclusive_at_its_end():
    clock = FakeClock()
    c = started(canary(), clock)
    c.run(until=Do.ANALYSE)  # t=0 of the step: passed
    applied = clock.now
    r = c.rollout
    for _ in range(4):  # t=60..240
        c.run(until=Do.ANALYSE)
    assert r.phase == 0
    c.verdict = Verdict.INCONCLUSIVE
    c.run(until=Do.ANALYSE)  # t=300: dwell over, inconclusive
    assert clock.now == applied + 300
    assert r.phase == 0
    c.verdict = Verdict.PASSED
    c.run(until=Do.ANALYSE)
    assert r.poll().do is Do.PUBLISH
    assert r.phase == 1


def test_failure_limit_needs_consecutive_failures():
    clock = FakeClock()
    c = started(canary(failure_limit=2), clock)
    c.verdict = Verdict.FAILED
    c.run(until=Do.ANALYSE)
    assert state(c.rollout) is State.PROGRESSING
    c.verdict = Verdict.PASSED
    c.run(until=Do.ANALYSE)
    c.verdict = Verdict.FAILED
    c.run(until=Do.ANALYSE)
    assert state(c.rollout) is State.PROGRESSING
    c.run(until=Do.ANALYSE)
    assert state(c.rollout) is State.ROLLING_BACK


def test_an_analysis_error_pauses_at_once_and_never_rolls_back():
    clock = FakeClock()
    c = started(canary(), clock)
    c.verdict = Verdict.ERROR
    assert c.run().do is Do.PAUSED
    assert c.rollout.message.startswith("ERROR: error rate")
    assert c.rollout.route().weights == {2: 10.0, 1: 90.0}


def test_an_analysis_for_another_phase_is_ignored():
    clock = FakeClock()
    c = started(canary(), clock)
    c.run(until=Do.ANALYSE)
    assert c.rollout.observe(5, verdict_analysis(Verdict.FAILED, clock.now)) is False
    assert state(c.rollout) is State.PROGRESSING


def test_blue_green_flips_keeps_the_old_version_warm_and_rolls_back_without_a_load():
    clock = FakeClock()
    c = started(blue_green(), clock)
    c.run(until=Do.AWAIT_ACK)
    r = c.rollout
    assert c.published[0][1] == {2: 100.0}
    a = r.poll()
    assert (a.do, a.until) == (Do.WAIT, clock.now + 600.0)
    assert r.loaded == {1, 2}
    r.abort("ops@example.com", "dashboards look wrong")
    assert r.poll().do is Do.PUBLISH  # the old version is warm: straight to the route
    assert c.run().do is Do.NOTHING
    assert state(r) is State.ROLLED_BACK
    assert c.published[-1][1] == {1: 100.0}
    assert [a.version for a in c.done if a.do is Do.LOAD] == [2]


def test_blue_green_unloads_the_old_version_after_the_window_and_undo_loads_it_again():
    clock = FakeClock()
    c = started(blue_green(), clock)
    assert c.run().do is Do.NOTHING
    r = c.rollout
    assert state(r) is State.SUCCEEDED
    assert r.loaded == {2}
    r.undo("ops@example.com", "regret")
    a = r.poll()
    assert (a.do, a.version) == (Do.LOAD, 1)
    assert c.run().do is Do.NOTHING
    assert state(r) is State.ROLLED_BACK
    assert c.published[-1][1] == {1: 100.0}
    assert r.loaded == {1}


def test_blue_green_analysis_after_the_flip_drops_checks_against_a_baseline():
    clock = FakeClock()
    spec = blue_green(analysis=AnalysisSpec(min_samples=100, max_error_rate=0.01, max_error_ratio=1.0))
    c = started(spec, clock)
    a = c.run(until=Do.ANALYSE)
    assert a.baseline is None
    assert a.analysis is not None
    assert (a.analysis.max_error_ratio, a.analysis.max_error_rate) == (None, 0.01)


def test_a_first_deployment_without_baseline_pauses_instead_of_rolling_back_to_nothing():
    clock = FakeClock()
    c = started(blue_green(baseline=None, analysis=ANALYSIS), clock)
    c.verdict = Verdict.FAILED
    assert c.run().do is Do.PAUSED
    assert c.rollout.message.startswith("no baseline to roll back to")
    with pytest.raises(RolloutError, match="no baseline"):
        c.rollout.undo("ops", "")


def test_with_automatic_rollback_off_a_failure_pauses_for_a_person():
    clock = FakeClock()
    c = started(canary(auto_rollback=False), clock)
    c.verdict = Verdict.FAILED
    assert c.run().do is Do.PAUSED
    assert c.rollout.message.startswith("automatic rollback is off: FAILED: error rate")
    assert c.rollout.route().weights == {2: 10.0, 1: 90.0}


def test_a_load_finishing_after_an_abort_is_unloaded():
    clock = FakeClock()
    c = started(canary(), clock)
    assert c.rollout.poll().do is Do.LOAD
    c.rollout.abort("ops", "changed my mind")
    c.run()
    assert state(c.rollout) is State.ROLLED_BACK
    c.rollout.loaded_version(2)  # the load that was in flight
    a = c.rollout.poll()
    assert (a.do, a.version) == (Do.UNLOAD, 2)


def test_shadow_mirrors_judges_the_mirrored_windows_then_stops_mirroring_and_unloads_the_candidate():
    clock = FakeClock()
    spec = RolloutSpec(
        "churn", 2, 1, Strategy.SHADOW, mirror_percent=20.0, shadow_duration=600.0,
        analysis=AnalysisSpec(min_samples=100, max_shadow_disagreement=0.05),
    )  # fmt: skip
    c = started(spec, clock)
    a = c.run(until=Do.ANALYSE)
    assert (a.mirrored, a.with_mirror, a.baseline) == (True, True, 1)
    assert c.published[0][1:] == ({1: 100.0}, {2: 20.0})
    assert c.run().do is Do.NOTHING
    r = c.rollout
    assert state(r) is State.SUCCEEDED
    assert c.published[-1][1:] == ({1: 100.0}, {})
    assert [a.version for a in c.done if a.do is Do.UNLOAD] == [2]


def test_a_canary_step_may_mirror_and_is_judged_on_its_shadow_comparisons_too():
    clock = FakeClock()
    spec = canary(
        steps=(CanaryStep(5.0, dwell=60.0, mirror=50.0),),
        analysis=AnalysisSpec(min_samples=100, max_shadow_disagreement=0.1),
    )
    c = started(spec, clock)
    a = c.run(until=Do.ANALYSE)
    assert (a.mirrored, a.with_mirror) == (False, True)
    assert a.analysis is not None
    assert a.analysis.max_shadow_disagreement == 0.1
    assert c.published[0][1:] == ({2: 5.0, 1: 95.0}, {2: 50.0})
    c.run(until=Do.ANALYSE)
    c.run(until=Do.ANALYSE)  # the full phase mirrors nothing, so it drops the shadow check
    assert c.rollout.phase == 1
    assert c.done[-1].analysis is not None
    assert c.done[-1].analysis.max_shadow_disagreement is None


def test_a_step_with_a_gate_waits_for_resume():
    clock = FakeClock()
    spec = canary(steps=(CanaryStep(10.0, dwell=60.0, pause_after=True), CanaryStep(50.0, dwell=60.0)))
    c = started(spec, clock)
    assert c.run().do is Do.PAUSED
    assert c.rollout.message == "canary 10% done; waiting for resume or promote"
    c.rollout.resume("ops", "looks fine")
    assert c.rollout.phase == 1


def test_promote_skips_a_step_or_goes_to_full():
    clock = FakeClock()
    c = started(canary(steps=(CanaryStep(1.0, 60.0), CanaryStep(10.0, 60.0), CanaryStep(50.0, 60.0))), clock)
    with pytest.raises(RolloutError, match="PENDING"):
        c.rollout.promote("ops", "hurry")
    c.run(until=Do.ANALYSE)
    c.rollout.promote("ops", "skip")
    assert c.rollout.phase == 1
    assert c.rollout.poll().do is Do.PUBLISH
    c.rollout.promote("ops", "ship it", full=True)
    assert c.rollout.phases[c.rollout.phase].name == "full"
    assert c.run().do is Do.NOTHING
    promoted = [e for e in c.rollout.events if e.kind == "promoted"]
    assert [(e.actor, e.reason) for e in promoted] == [("ops", "skip canary 1%: skip"), ("ops", "to full: ship it")]


def test_verbs_that_do_not_apply_are_refused_and_change_nothing():
    clock = FakeClock()
    c = started(canary(), clock)
    c.run(until=Do.ANALYSE)
    r = c.rollout
    before = r.to_dict()
    for verb in (r.resume, r.retry):
        with pytest.raises(RolloutError, match="PROGRESSING"):
            verb("ops", "")
    assert r.to_dict() == before
    r.abort("ops", "")
    c.run()
    for verb in (r.abort, r.undo, r.pause, r.resume):
        with pytest.raises(RolloutError, match="ROLLED_BACK"):
            verb("ops", "")


def test_pause_while_loading_then_the_load_completes_and_resume_continues():
    clock = FakeClock()
    c = started(canary(), clock)
    c.rollout.pause("ops", "hold on")
    assert c.rollout.poll().do is Do.PAUSED
    c.rollout.loaded_version(2)
    c.rollout.resume("ops", "go")
    assert state(c.rollout) is State.PROGRESSING
    assert c.run().do is Do.NOTHING


def test_a_load_failure_before_traffic_fails_and_retry_loads_again():
    clock = FakeClock()
    c = started(canary(), clock)
    c.rollout.load_failed(2, "out of memory")
    r = c.rollout
    assert state(r) is State.FAILED
    assert r.message == "version 2 failed to load: out of memory"
    assert r.route().weights == {1: 100.0}
    assert r.poll().do is Do.NOTHING
    r.retry("ops", "bigger nodes")
    assert state(r) is State.PENDING
    assert r.poll().do is Do.LOAD
    assert c.run().do is Do.NOTHING
    assert state(r) is State.SUCCEEDED


def test_losing_the_candidate_after_traffic_rolls_back():
    clock = FakeClock()
    c = started(canary(), clock)
    c.run(until=Do.ANALYSE)
    c.rollout.load_failed(2, "predictor crashed")
    assert state(c.rollout) is State.ROLLING_BACK


def test_an_unloaded_version_the_route_needs_is_loaded_and_published_again():
    clock = FakeClock()
    c = started(canary(), clock)
    c.run(until=Do.ANALYSE)
    c.rollout.unloaded(2)
    assert c.rollout.poll().do is Do.LOAD
    c.step()
    assert c.rollout.poll().do is Do.PUBLISH


def test_a_rollout_resumes_from_its_stored_state_exactly():
    clock = FakeClock()
    c = started(canary(), clock)
    c.run(until=Do.ANALYSE)
    c.run(until=Do.ANALYSE)
    stored = json.loads(json.dumps(c.rollout.to_dict()))
    clock.advance(45)
    resumed = Rollout.from_dict(stored, clock)
    assert resumed.to_dict() == c.rollout.to_dict()
    assert resumed.poll() == c.rollout.poll()
    c2 = Controller(resumed, clock, revision=c.revision)
    assert c2.run().do is Do.NOTHING
    assert state(resumed) is State.SUCCEEDED


def test_plans_of_each_strategy():
    assert [p.name for p in plan(canary())] == ["canary 10%", "canary 50%", "full"]
    assert [p.name for p in plan(canary(steps=(CanaryStep(100.0, 5.0),)))] == ["canary 100%"]
    assert [(p.name, p.weight) for p in plan(blue_green())] == [("switch", 100.0)]
    shadow = RolloutSpec("m", 2, 1, Strategy.SHADOW, mirror_percent=5.0)
    assert [(p.weight, p.mirror) for p in plan(shadow)] == [(0.0, 5.0), (0.0, 0.0)]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"steps": ()}, "steps"),
        ({"steps": (CanaryStep(50.0), CanaryStep(10.0))}, r"steps\[1\].weight"),
        ({"steps": (CanaryStep(0.0),)}, r"steps\[0\].weight"),
        ({"steps": (CanaryStep(10.0, mirror=101.0),)}, r"steps\[0\].mirror"),
        ({"baseline": None}, "baseline"),
        ({"baseline": 2}, "baseline"),
        ({"failure_limit": 0}, "failure_limit"),
        ({"analysis_interval": 0.0}, "analysis_interval"),
        ({"strategy": Strategy.SHADOW, "steps": ()}, "mirror_percent"),
        ({"strategy": Strategy.BLUE_GREEN}, "only a canary has steps"),
    ],
)
def test_spec_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        canary(**kwargs)


def test_spec_round_trips_and_refuses_unknown_fields():
    spec = canary(steps=(CanaryStep(10.0, 60.0, mirror=5.0, pause_after=True),))
    assert RolloutSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="unknown field 'stepz'"):
        RolloutSpec.from_dict(spec.to_dict() | {"stepz": []})
    with pytest.raises(ValueError, match="strategy"):
        RolloutSpec.from_dict(spec.to_dict() | {"strategy": "rainbow"})
