"""Applying specs by generation, and rollouts judged on real merged windows end to end (in process)."""

from __future__ import annotations

import pytest

from model_manager.actions import Do, State
from model_manager.analysis import AnalysisSpec, Check, Verdict
from model_manager.plans import CanaryStep, RolloutSpec, Strategy
from model_manager.reconcile import Outcome, apply, run_analysis
from model_manager.rollout import Rollout, RolloutError
from model_manager.windows import LATENCY_BOUNDS_MS, Histogram, MetricWindow, WindowLedger
from tests.model_manager.rollout_driver import Controller, FakeClock


def state(r: Rollout) -> State:
    return r.state


def spec(**kw) -> RolloutSpec:
    args = {
        "model": "churn",
        "version": 2,
        "baseline": 1,
        "strategy": Strategy.CANARY,
        "steps": (CanaryStep(10.0, dwell=600.0), CanaryStep(50.0, dwell=600.0)),
        "analysis": AnalysisSpec(min_samples=500, max_error_rate=0.01, max_error_ratio=2.0),
        "inconclusive_limit": 1200.0,
        "analysis_interval": 60.0,  # ten-minute steps in a few analyses each
    }
    return RolloutSpec(**(args | kw))


# -- generations ---------------------------------------------------------------------------------------------------


def test_after_an_abort_the_same_spec_reports_the_rollback_and_only_retry_restarts():
    clock = FakeClock()
    first = apply(None, spec(), 3, clock, rollout_id="r-1")
    assert first.outcome is Outcome.STARTED
    r = first.rollout
    c = Controller(r, clock)
    c.run(until=Do.ANALYSE)
    r.abort("ops@example.com", "pager went off")
    c.run()
    assert state(r) is State.ROLLED_BACK
    for generation in (3, 4):
        again = apply(r, spec(), generation, clock, rollout_id="r-2")
        assert again.outcome is Outcome.HELD
        assert again.rollout is r
        assert again.message == "rolled back at generation 3: pager went off; retry starts it again"
        assert r.poll().do is Do.NOTHING
    r.retry("ops@example.com", "fixed the pager")
    assert state(r) in (State.PENDING, State.PROGRESSING)
    assert r.to_dict()["attempt"] == 2
    assert c.run().do is Do.NOTHING
    assert state(r) is State.SUCCEEDED


def test_the_same_spec_while_running_changes_nothing():
    clock = FakeClock()
    r = apply(None, spec(), 3, clock, rollout_id="r-1").rollout
    before = r.to_dict()
    again = apply(r, spec(), 3, clock, rollout_id="r-2")
    assert (again.outcome, again.rollout, again.message) == (Outcome.UNCHANGED, r, "unchanged at generation 3")
    assert r.to_dict() == before


def test_a_failed_rollout_is_held_too():
    clock = FakeClock()
    r = apply(None, spec(), 3, clock, rollout_id="r-1").rollout
    r.load_failed(2, "bad artifact")
    held = apply(r, spec(), 3, clock, rollout_id="r-2")
    assert held.outcome is Outcome.HELD
    assert held.message.startswith("failed at generation 3")


def test_a_changed_spec_supersedes_an_active_rollout():
    clock = FakeClock()
    old = apply(None, spec(), 3, clock, rollout_id="r-1").rollout
    Controller(old, clock).run(until=Do.ANALYSE)
    # Same version, other thresholds: the loaded candidate is kept.
    tweaked = apply(old, spec(inconclusive_limit=60.0), 4, clock, rollout_id="r-2")
    assert tweaked.outcome is Outcome.SUPERSEDED
    assert tweaked.superseded is old
    assert state(old) is State.ABORTED
    assert old.poll().do is Do.NOTHING
    assert state(tweaked.rollout) is State.PROGRESSING
    assert tweaked.rollout.poll().do is Do.PUBLISH
    # Another version: the superseded candidate is unloaded.
    other = apply(tweaked.rollout, spec(version=3), 5, clock, rollout_id="r-3")
    a = tweaked.rollout.poll()
    assert (a.do, a.version) == (Do.UNLOAD, 2)
    assert state(other.rollout) is State.PENDING


def test_an_older_generation_or_another_model_is_refused():
    clock = FakeClock()
    r = apply(None, spec(), 3, clock, rollout_id="r-1").rollout
    with pytest.raises(RolloutError, match="generation: 2 is older than the rollout's generation 3"):
        apply(r, spec(analysis=None), 2, clock, rollout_id="r-2")
    with pytest.raises(ValueError, match="model"):
        apply(r, spec(model="fraud"), 4, clock, rollout_id="r-2")


# -- judged on merged windows ----------------------------------------------------------------------------------------


class Traffic:
    """Gateways reporting a minute of windows per version under the acknowledged revision."""

    def __init__(self, ledger: WindowLedger, clock: FakeClock) -> None:
        self.ledger, self.clock, self.n = ledger, clock, 0

    def report(self, version: int, revision: int, ok: int, server: int = 0, client: int = 0) -> None:
        self.n += 1
        w = MetricWindow(
            window_id=f"g1-{self.n}",
            gateway_id="g1",
            model="churn",
            version=version,
            route_revision=revision,
            start=self.clock.now - 60,
            end=self.clock.now,
            status_counts={"OK": ok, "INTERNAL": server, "INVALID_ARGUMENT": client},
            latency_ms=Histogram.of(LATENCY_BOUNDS_MS, [4.0] * (ok + server)),
        )
        self.ledger.add(w)
        self.ledger.add(w)  # a retried report counts once


def drive(r: Rollout, clock: FakeClock, per_minute: dict[int, tuple[int, int, int]], limit: int = 400) -> None:
    """Runs a rollout against windows: every analysis reads what the traffic reported since the last one."""
    ledger = WindowLedger()
    traffic = Traffic(ledger, clock)
    # Windows of an older route revision with a burst of errors must never count.
    traffic.report(2, 0, ok=0, server=500)
    c = Controller(r, clock)
    for _ in range(limit):
        a = r.poll()
        if a.do in (Do.PAUSED, Do.NOTHING):
            return
        if a.do is Do.ANALYSE:
            assert a.revision is not None
            for version, (ok, server, client) in per_minute.items():
                if version == 2 or a.baseline is not None:
                    traffic.report(version, a.revision, ok, server, client)
            r.observe(a.phase, run_analysis(a, ledger, clock.now))
        else:
            c.step()
    raise AssertionError("rollout did not settle")


def test_an_erroring_canary_rolls_back_on_its_own_with_value_threshold_and_samples():
    clock = FakeClock()
    r = Rollout.start("r-1", spec(), 3, clock)
    drive(r, clock, {2: (570, 30, 0), 1: (5394, 6, 0)})
    assert state(r) is State.ROLLED_BACK
    rollback = next(e for e in r.events if e.kind == "rollback_started")
    d = next(x for x in rollback.decisions if x.check is Check.ERROR_RATE)
    assert (d.verdict, d.measured, d.threshold, d.samples) == (Verdict.FAILED, 0.05, 0.01, 600)
    assert d.window_start is not None
    assert d.window_end == d.window_start + 60  # the first analysis after the step: one window
    assert "error rate 0.0500 (30/600) vs limit 0.0100, significantly above" in r.message


def test_a_canary_at_too_little_traffic_holds_and_pauses_with_the_counts_never_rolling_back():
    clock = FakeClock()
    r = Rollout.start("r-1", spec(analysis_interval=1200.0), 3, clock)
    # 36 requests over the first 30 minutes of the step (two reports), every one of them a server error.
    drive(r, clock, {2: (0, 18, 0), 1: (40, 0, 0)})
    assert state(r) is State.PAUSED
    assert r.message == "canary 10%: INCONCLUSIVE, 36/500 samples after 30 m"
    assert not any(e.kind == "rollback_started" for e in r.events)
    assert r.route().weights == {2: 10.0, 1: 90.0}


def test_client_errors_on_a_canary_do_not_count_against_it():
    clock = FakeClock()
    r = Rollout.start("r-1", spec(), 3, clock)
    drive(r, clock, {2: (600, 0, 400), 1: (5400, 3, 10)})
    assert state(r) is State.SUCCEEDED
    last = [e for e in r.events if e.kind == "phase_completed"][-1]
    d = next(x for x in last.decisions if x.check is Check.ERROR_RATE)
    assert (d.measured, d.verdict) == (0.0, Verdict.PASSED)


def test_run_analysis_refuses_other_actions():
    clock = FakeClock()
    r = Rollout.start("r-1", spec(), 3, clock)
    with pytest.raises(ValueError, match="ANALYSE"):
        run_analysis(r.poll(), WindowLedger(), clock.now)
