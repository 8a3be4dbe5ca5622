"""Driving a rollout's phases: what is due by the clock, and the one next action for the controller."""

from __future__ import annotations

from dataclasses import replace

from model_manager.actions import FINISHED, Action, Do, Pause, State
from model_manager.analysis import AnalysisSpec, Check, Verdict
from model_manager.rollout_core import RolloutCore, fmt_minutes


class RolloutPhases(RolloutCore):
    """The loop: `poll` applies what is due, then names the next action (load, publish, await, analyse, wait)."""

    def poll(self) -> Action:
        """Applies what is due by the clock, then returns the next action."""
        for _ in range(len(self.phases) + 4):  # each pass completes at most one phase
            action = self._next(self._clock())
            if action is not None:
                return action
        raise AssertionError("rollout: no action after completing every phase")  # pragma: no cover

    def _next(self, now: float) -> Action | None:
        d = self._d
        if d.state is State.PAUSED:
            return Action(Do.PAUSED, reason=d.message)
        if d.state in FINISHED:
            if d.to_unload:
                return Action(Do.UNLOAD, version=d.to_unload[0])
            return Action(Do.NOTHING, reason=d.message)
        if d.gates == "running":  # the controller watches the gates' operation and calls `gates_done`
            return Action(Do.WAIT, reason=d.message)
        if self._holding_switch():
            return self._before_switch(now)
        route = self.route()
        missing = sorted(route.versions() - set(d.loaded))
        if missing:
            return Action(Do.LOAD, version=missing[0])
        if d.revision is None:
            return Action(Do.PUBLISH, route=route, serial=d.serial)
        if d.applied_revision is None:
            assert d.published_at is not None
            until = d.published_at + self.spec.ack_timeout
            if d.state is State.PROGRESSING and now >= until:
                self._pause(
                    Pause.ACK_TIMEOUT,
                    f"route revision {d.revision} not acknowledged after {fmt_minutes(self.spec.ack_timeout)}",
                )
                return Action(Do.PAUSED, reason=d.message)
            # A rollback keeps waiting: it never pauses, the controller keeps pushing the same route.
            return Action(Do.AWAIT_ACK, revision=d.revision, until=until if d.state is State.PROGRESSING else None)
        return self._run_phase(now)

    def _before_switch(self, now: float) -> Action | None:
        """Loads the new version, keeps it warm for the warm-up time, then waits for a person if asked to."""
        d, spec = self._d, self.spec
        if spec.version not in d.loaded:
            return Action(Do.LOAD, version=spec.version)
        missing = sorted(self.route().versions() - set(d.loaded))
        if missing:
            return Action(Do.LOAD, version=missing[0])
        warm_at = d.warm_at if d.warm_at is not None else now
        ready = warm_at + spec.warmup
        if now < ready:
            said = f"version {spec.version} warming up: switch after {fmt_minutes(spec.warmup)} warm"
            if d.message != said:
                d.message = said
                d.updated_at = now
            return Action(Do.WAIT, until=ready, phase=d.phase)
        if spec.manual_switch and not d.switch_approved:
            self._pause(Pause.SWITCH_GATE, f"version {spec.version} is warm; resume (or promote) to switch")
            return Action(Do.PAUSED, reason=d.message)
        d.switch_open = True
        return None

    def _run_phase(self, now: float) -> Action | None:
        d, spec = self._d, self.spec
        phase = self.phases[d.phase]
        assert d.applied_at is not None
        dwell_end = d.applied_at + phase.dwell
        if not phase.analysed:
            if now >= dwell_end:
                self._complete_phase("dwell over")
                return None
            return Action(Do.WAIT, until=dwell_end, phase=d.phase)
        last = d.last_analysis
        if last is not None and last.verdict is Verdict.PASSED and last.evaluated_at >= dwell_end and now >= dwell_end:
            self._complete_phase(last.reason, last.decisions)
            return None
        hold_end = max(dwell_end, d.hold_from or dwell_end) + spec.inconclusive_limit
        if now >= hold_end:
            held = last.decisions if last is not None else ()
            self._pause(Pause.HOLD_LIMIT, self._hold_message(now), decisions=held)
            return Action(Do.PAUSED, reason=d.message)
        due = d.next_analysis_at if d.next_analysis_at is not None else now
        if now >= due:
            return self._analyse_action()
        return Action(Do.WAIT, until=min(due, hold_end), phase=d.phase)

    def _analyse_action(self) -> Action:
        d, spec = self._d, self.spec
        phase = self.phases[d.phase]
        # A step's own sample minimum raises the guard: too few judged samples hold it as INCONCLUSIVE.
        checks = spec.analysis or AnalysisSpec(min_samples=max(phase.min_samples, 1))
        if phase.min_samples > checks.min_samples:
            checks = replace(checks, min_samples=phase.min_samples)
        sharing = spec.baseline is not None and phase.weight < 100.0
        if not sharing:  # nothing serves alongside: only absolute limits apply
            checks = replace(checks, max_error_ratio=None, max_latency_p99_ratio=None)
        if phase.mirror <= 0:
            checks = replace(checks, max_shadow_disagreement=None)
        return Action(
            Do.ANALYSE,
            model=spec.model,
            phase=d.phase,
            since=d.applied_at,
            revision=d.applied_revision,
            version=spec.version,
            baseline=spec.baseline if sharing else None,
            mirrored=phase.mirrored,
            with_mirror=phase.mirror > 0,
            analysis=checks,
        )

    def _hold_message(self, now: float) -> str:
        d = self._d
        phase = self.phases[d.phase]
        elapsed = fmt_minutes(now - (d.applied_at or now))
        last = d.last_analysis
        if last is None:
            return f"{phase.name}: no analysis after {elapsed}"
        guard = last.decision(Check.SAMPLES)
        counts = f"{guard.samples}/{guard.min_samples} samples" if guard is not None else last.reason
        return f"{phase.name}: {last.verdict.value}, {counts} after {elapsed}"
