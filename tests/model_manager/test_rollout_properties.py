"""Properties over any sequence of controller events, analysis verdicts, clock moves, restarts and verbs.

No sequence ever completes an analysed step without a PASSED verdict at or after its dwell, rolls back
on its own without a FAILED verdict resting on enough samples (or a lost version), leaves an unfinished
rollout without a next action, or loses anything through a store-and-resume.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from model_manager.actions import FINISHED, Do, State
from model_manager.analysis import AnalysisSpec, Check, Verdict
from model_manager.plans import CanaryStep, RolloutSpec, Strategy, plan
from model_manager.rollout import Rollout, RolloutError
from tests.model_manager.rollout_driver import Controller, FakeClock

ANALYSIS = AnalysisSpec(min_samples=100, max_error_rate=0.01)
SPECS = [
    RolloutSpec(
        "m", 2, 1, Strategy.CANARY,
        steps=(CanaryStep(5.0, 120.0), CanaryStep(25.0, 0.0, mirror=10.0, pause_after=True), CanaryStep(50.0, 300.0)),
        analysis=ANALYSIS, analysis_interval=60.0, inconclusive_limit=600.0, failure_limit=2, ack_timeout=20.0,
    ),
    RolloutSpec("m", 2, 1, Strategy.CANARY, steps=(CanaryStep(10.0, 60.0), CanaryStep(100.0, 60.0))),
    RolloutSpec("m", 2, 1, Strategy.BLUE_GREEN, keep_previous_for=300.0, analysis=ANALYSIS, inconclusive_limit=120.0),
    RolloutSpec("m", 2, None, Strategy.BLUE_GREEN, keep_previous_for=60.0, analysis=ANALYSIS),
    RolloutSpec(
        "m", 2, 1, Strategy.SHADOW, mirror_percent=20.0, shadow_duration=180.0,
        analysis=AnalysisSpec(min_samples=100, max_shadow_disagreement=0.05), analysis_interval=45.0,
    ),
]  # fmt: skip

VERBS = ("pause", "resume", "promote", "promote_full", "abort", "undo", "retry")

ops = st.lists(
    st.one_of(
        st.tuples(st.just("follow"), st.integers(1, 12)),
        st.tuples(st.just("follow"), st.integers(1, 12)),
        st.tuples(st.just("hold_ack"), st.just(0)),
        st.tuples(st.just("tick"), st.sampled_from([1.0, 20.0, 61.0, 300.0, 700.0, 2000.0])),
        st.tuples(st.just("verdict"), st.sampled_from(list(Verdict))),
        st.tuples(st.just("verb"), st.sampled_from(VERBS)),
        st.tuples(st.just("load_failed"), st.sampled_from([1, 2])),
        st.tuples(st.just("unloaded"), st.sampled_from([1, 2])),
        st.tuples(st.just("stale_ack"), st.just(0)),
        st.tuples(st.just("restart"), st.just(0)),
    ),
    max_size=80,
)


def verb(r: Rollout, name: str) -> None:
    if name == "promote_full":
        r.promote("ops", "now", full=True)
    elif name == "promote":
        r.promote("ops", "skip")
    else:
        getattr(r, name)("ops", name)


def check_invariants(r: Rollout, clock: FakeClock) -> None:
    a = r.poll()
    if r.state not in FINISHED:
        assert a.do is not Do.NOTHING, "an unfinished rollout must have a next action"
    else:
        assert a.do in (Do.NOTHING, Do.UNLOAD)
    if a.do is Do.WAIT:
        assert a.until is not None
        assert a.until > clock.now, "a wait must end in the future"
    if a.do is Do.AWAIT_ACK and a.until is not None:
        assert a.until > clock.now
    if r.state is State.PAUSED:
        probe = Rollout.from_dict(r.to_dict(), clock)
        probe.resume("probe", "a paused rollout can always be resumed")
    phases = plan(r.spec)
    for e in r.events:
        if e.kind == "phase_completed" and phases[e.phase].analysed:
            assert e.decisions, "an analysed step completes only on an analysis"
            assert all(d.verdict is Verdict.PASSED for d in e.decisions), "never promote on inconclusive"
        if e.kind == "rollback_started" and not e.actor:
            if "failed to load" in e.reason:
                continue
            guard = next(d for d in e.decisions if d.check is Check.SAMPLES)
            assert guard.verdict is Verdict.PASSED, "never roll back on no data"
            assert any(d.verdict is Verdict.FAILED for d in e.decisions)
    stored = json.loads(json.dumps(r.to_dict()))
    assert Rollout.from_dict(stored, clock).to_dict() == r.to_dict()


@settings(deadline=None, max_examples=400)
@given(st.sampled_from(range(len(SPECS))), ops)
def test_no_sequence_breaks_the_rollout_rules(which, sequence):
    clock = FakeClock()
    c = Controller(Rollout.start("r", SPECS[which], 1, clock), clock)
    for op, arg in sequence:
        r = c.rollout
        if op == "follow":
            for _ in range(int(arg)):
                c.step()
        elif op == "hold_ack":
            c.step(ack=False)
        elif op == "tick":
            clock.advance(float(arg))
        elif op == "verdict":
            c.verdict = arg
        elif op == "verb":
            before = r.to_dict()
            try:
                verb(r, str(arg))
            except RolloutError:
                assert r.to_dict() == before, "a refused verb changes nothing"
        elif op == "load_failed":
            r.load_failed(int(arg), "boom")
        elif op == "unloaded":
            r.unloaded(int(arg))
        elif op == "stale_ack":
            r.acknowledged(0)
        elif op == "restart":
            c.rollout = Rollout.from_dict(json.loads(json.dumps(r.to_dict())), clock)
        check_invariants(c.rollout, clock)


@settings(deadline=None, max_examples=150)
@given(
    st.sampled_from(range(len(SPECS))), st.lists(st.sampled_from([Verdict.PASSED, Verdict.INCONCLUSIVE]), max_size=30)
)
def test_without_failures_a_rollout_always_reaches_an_end_or_a_person(which, verdicts):
    clock = FakeClock()
    c = Controller(Rollout.start("r", SPECS[which], 1, clock), clock)
    for v in verdicts:
        c.verdict = v
        c.step()
        check_invariants(c.rollout, clock)
    c.verdict = Verdict.PASSED
    last = c.run(limit=500)
    assert last.do in (Do.NOTHING, Do.PAUSED)
    assert not any(e.kind == "rollback_started" for e in c.rollout.events)
    if last.do is Do.PAUSED:
        c.rollout.resume("ops", "go on")
        assert c.run(limit=500).do is Do.NOTHING
        assert c.rollout.state is State.SUCCEEDED
