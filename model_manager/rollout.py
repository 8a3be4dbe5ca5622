"""The rollout state machine: plain data driven by events, verbs and an injected clock.

A controller loops on `poll()`, which applies what the clock says is due and returns the one next
action (load, publish a route, wait for its acknowledgement, analyse, wait, unload, or a pause that
needs a person), and feeds back what happened: `loaded_version`, `load_failed`, `published`, `acknowledged`,
`observe` (an analysis), `unloaded`. A phase counts as applied only once the gateways have
acknowledged the route revision that carries it, and its analysis reads only windows reported under
that revision or later. The whole state is a JSON-ready dict, so it can be stored and resumed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from model_manager.actions import ACTIVE, FINISHED, Action, Do, Event, Pause, RolloutRecord, State
from model_manager.analysis import Analysis, AnalysisSpec, Check, Decision, Verdict
from model_manager.plans import Phase, RolloutSpec, Route, Strategy, plan, rollback_route

Clock = Callable[[], float]
# Every kind of event a rollout records; the contract maps each to a RolloutEventType.
EVENT_KINDS = frozenset(
    {
        "created", "gates_started", "gates_passed", "gates_failed", "loaded", "load_failed", "published", "applied",
        "phase_completed", "analysis_failed", "unhealthy", "paused", "resumed", "promoted", "rollback_started",
        "rolled_back", "succeeded", "retried", "superseded",
    }
)  # fmt: skip


class RolloutError(Exception):
    """A verb that does not apply to the rollout in its current state."""


def _fmt_minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} m" if seconds >= 60 else f"{seconds:.0f} s"


class Rollout:
    """One rollout of one model version; every method reads the time from the injected clock."""

    def __init__(self, data: RolloutRecord, clock: Clock) -> None:
        self._d = data
        self._clock = clock
        self.phases: tuple[Phase, ...] = plan(data.spec)

    @classmethod
    def start(
        cls, rollout_id: str, spec: RolloutSpec, generation: int, clock: Clock, *, gate_operation: str = ""
    ) -> Rollout:
        """A new rollout, waiting for its version to be loaded and warmed (first for the promotion gates running as
        `gate_operation`, if given: nothing is loaded or served before they pass)."""
        now = clock()
        loaded = [spec.baseline] if spec.baseline is not None else []
        r = cls(RolloutRecord(rollout_id, spec, generation, State.PENDING, now, loaded=loaded, updated_at=now), clock)
        r._event("created", f"{spec.strategy.value} of {spec.model} version {spec.version} at generation {generation}")
        if gate_operation:
            r._start_gates(gate_operation)
        return r

    # -- read side -------------------------------------------------------------------------------------------------

    @property
    def rollout_id(self) -> str:
        return self._d.rollout_id

    @property
    def spec(self) -> RolloutSpec:
        return self._d.spec

    @property
    def generation(self) -> int:
        return self._d.generation

    @property
    def state(self) -> State:
        return self._d.state

    @property
    def phase(self) -> int:
        return self._d.phase

    @property
    def message(self) -> str:
        return self._d.message

    @property
    def events(self) -> tuple[Event, ...]:
        return tuple(self._d.events)

    @property
    def last_analysis(self) -> Analysis | None:
        return self._d.last_analysis

    @property
    def loaded(self) -> frozenset[int]:
        return frozenset(self._d.loaded)

    @property
    def gate_operation(self) -> str:
        """The promotion operation running (or that ran) the version's gates for this rollout; empty if none."""
        return self._d.gate_operation

    @property
    def gates(self) -> str:
        """Where the gates are: "" (none ran), "running", "passed" or "failed"."""
        return self._d.gates

    @property
    def gate_results(self) -> tuple[dict[str, Any], ...]:
        """The gate results as the controller handed them over (opaque to the rollout)."""
        return tuple(self._d.gate_results)

    @property
    def unhealthy_deadline(self) -> float | None:
        """When the new version's lack of a healthy endpoint outlasts the grace period, if it lacks one now."""
        since = self._d.unhealthy_since
        return None if since is None else since + self.spec.unhealthy_grace

    def route(self) -> Route:
        """The route this rollout wants the gateways to apply now."""
        if self._d.state in (State.ROLLING_BACK, State.ROLLED_BACK, State.FAILED, State.ABORTED):
            return rollback_route(self.spec)  # an aborted rollout's successor owns the route
        if self._d.state is State.SUCCEEDED:
            return self.phases[-1].route(self.spec)
        if self._d.gates == "running" or self._holding_switch():
            return rollback_route(self.spec)  # nothing of the new version is served before its gates and switch
        return self.phases[self._d.phase].route(self.spec)

    def _holding_switch(self) -> bool:
        """A blue-green switch still waits for its warm-up time or for a person."""
        d, spec = self._d, self.spec
        waits = spec.strategy is Strategy.BLUE_GREEN and (spec.warmup > 0 or spec.manual_switch)
        return waits and not d.switch_open and d.phase == 0 and not d.ever_applied

    def status(self) -> dict[str, Any]:
        """What a status call, the CLI or the event stream shows."""
        d = self._d
        last = d.last_analysis
        return {
            "rollout_id": d.rollout_id,
            "model": self.spec.model,
            "version": self.spec.version,
            "baseline": self.spec.baseline,
            "generation": d.generation,
            "attempt": d.attempt,
            "state": d.state.value,
            "phase": d.phase,
            "phases": [p.name for p in self.phases],
            "route": self.route().to_dict(),
            "acknowledged": d.applied_revision is not None and d.applied_revision == d.revision,
            "message": d.message,
            "verdict": None if last is None else last.verdict.value,
            "gates": d.gates,
            "decisions": [] if last is None else [x.to_dict() for x in last.decisions],
        }

    # -- persistence -----------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The whole state, JSON-ready, for durable storage."""
        return self._d.to_dict()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], clock: Clock) -> Rollout:
        """Resumes a rollout stored with `to_dict`."""
        return cls(RolloutRecord.from_dict(raw), clock)

    # -- the loop --------------------------------------------------------------------------------------------------

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
                    f"route revision {d.revision} not acknowledged after {_fmt_minutes(self.spec.ack_timeout)}",
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
            said = f"version {spec.version} warming up: switch after {_fmt_minutes(spec.warmup)} warm"
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
        elapsed = _fmt_minutes(now - (d.applied_at or now))
        last = d.last_analysis
        if last is None:
            return f"{phase.name}: no analysis after {elapsed}"
        guard = last.decision(Check.SAMPLES)
        counts = f"{guard.samples}/{guard.min_samples} samples" if guard is not None else last.reason
        return f"{phase.name}: {last.verdict.value}, {counts} after {elapsed}"

    # -- events from the controller --------------------------------------------------------------------------------

    def loaded_version(self, version: int) -> None:
        """A version is loaded and warm on the predictors."""
        d = self._d
        if version not in d.loaded:
            d.loaded.append(version)
        if version != self.spec.version:
            return
        if d.warm_at is None:
            d.warm_at = self._clock()
        if d.state in (State.ROLLED_BACK, State.FAILED, State.ABORTED) and version not in d.to_unload:
            d.to_unload.append(version)  # a load that finished after the rollout ended
        elif d.state is State.PENDING:
            self._set(State.PROGRESSING)
            self._event("loaded", f"version {version} loaded and warm")
        elif d.state is State.PAUSED and d.paused_from is State.PENDING:
            d.paused_from = State.PROGRESSING
            self._event("loaded", f"version {version} loaded and warm")

    def await_gates(self, operation: str) -> None:
        """The version's promotion gates run as `operation`: nothing is loaded or served before they pass."""
        self._require(ACTIVE, "await_gates")
        self._start_gates(operation)

    def gates_done(self, passed: bool, message: str, results: list[dict[str, Any]]) -> bool:
        """The promotion gates finished: passed (or forced), the rollout goes on to load; failed, it fails with
        the results and nothing is served. Stale or repeated calls are ignored."""
        d = self._d
        if d.gates != "running":
            return False
        d.gate_results = [dict(r) for r in results]
        if passed:
            d.gates = "passed"
            self._event("gates_passed", message)
            if d.state in ACTIVE:
                d.message = message
            return True
        d.gates = "failed"
        if d.state in ACTIVE:
            self._finish(State.FAILED, "gates_failed", f"failed at generation {d.generation}: {message}")
        else:
            self._event("gates_failed", message)
        return True

    def health(self, healthy: bool) -> bool:
        """Whether the new version has a healthy endpoint now; with `on_unhealthy`, none for longer than the
        grace period rolls back (or pauses, with no baseline or automatic rollback off). True if anything changed."""
        d, spec = self._d, self.spec
        watched = (
            spec.on_unhealthy
            and d.state in (State.PROGRESSING, State.PAUSED)
            and d.ever_applied
            and spec.version in self.route().versions()
        )
        if healthy or not watched:
            changed = d.unhealthy_since is not None
            d.unhealthy_since = None
            return changed
        now = self._clock()
        if d.unhealthy_since is None:
            d.unhealthy_since = now
            return True
        if now < d.unhealthy_since + spec.unhealthy_grace:
            return False
        reason = (
            f"version {spec.version} has had no healthy endpoint for {_fmt_minutes(now - d.unhealthy_since)} "
            f"(grace {_fmt_minutes(spec.unhealthy_grace)})"
        )
        d.unhealthy_since = None
        if d.state is State.PAUSED:
            return False  # already held for a person; the route stays as it is
        self._event("unhealthy", reason)
        if spec.baseline is None or not spec.auto_rollback:
            why = "no baseline to roll back to" if spec.baseline is None else "automatic rollback is off"
            self._pause(Pause.FAILED_HELD, f"{why}: {reason}")
        else:
            self._rollback(reason, "")
        return True

    def load_failed(self, version: int, reason: str) -> None:
        """A version could not be loaded: before any traffic the rollout fails, after it rolls back."""
        d = self._d
        if d.state is State.ROLLING_BACK and version == self.spec.baseline:
            self._event("load_failed", f"baseline version {version}: {reason}")
            return  # the next poll asks for the load again; a rollback never gives up
        if d.state not in ACTIVE or version != self.spec.version:
            return
        if d.ever_applied and self.spec.baseline is not None:
            self._rollback(f"version {version} failed to load: {reason}", "")
        elif d.ever_applied:
            self._pause(Pause.LOAD_FAILED, f"version {version} failed to load: {reason}")
        else:
            self._finish(State.FAILED, "load_failed", f"version {version} failed to load: {reason}")

    def published(self, serial: int, revision: int) -> bool:
        """The route of PUBLISH action `serial` went out as route revision `revision`; stale serials are ignored."""
        d = self._d
        if serial != d.serial or d.revision is not None or d.state in FINISHED:
            return False
        d.revision, d.published_at = revision, self._clock()
        d.applied_revision = None
        self._event("published", f"route revision {revision}: {self._route_text()}")
        return True

    def acknowledged(self, revision: int) -> bool:
        """The gateways acknowledged route revision `revision` (a later one carries the same route)."""
        d = self._d
        if d.revision is None or revision < d.revision or d.applied_revision is not None:
            return False
        now = self._clock()
        d.applied_revision, d.applied_at = d.revision, now
        if d.state is State.ROLLING_BACK:
            d.to_unload = [v for v in d.loaded if v == self.spec.version]
            self._finish(State.ROLLED_BACK, "rolled_back", f"rolled back at generation {d.generation}: {d.message}")
            return True
        d.ever_applied = True
        d.next_analysis_at, d.hold_from, d.failures = now, None, 0
        if self.phases[d.phase].analysed:  # an unanalysed last phase (stop mirroring) keeps the verdict that led to it
            d.last_analysis = None
        self._event("applied", f"{self.phases[d.phase].name} acknowledged at route revision {d.revision}")
        return True

    def observe(self, phase: int, analysis: Analysis) -> bool:
        """Takes the analysis of `phase`; one for another phase, or arriving late, is ignored."""
        d = self._d
        if d.state is not State.PROGRESSING or phase != d.phase or d.applied_at is None:
            return False
        d.last_analysis = analysis
        dwell_end = d.applied_at + self.phases[d.phase].dwell
        now = self._clock()
        nxt = now + self.spec.analysis_interval
        # The analysis that may complete a step is taken right when its dwell ends.
        d.next_analysis_at = min(nxt, dwell_end) if now < dwell_end else nxt
        verdict = analysis.verdict
        if verdict is Verdict.FAILED:
            d.failures += 1
            self._event("analysis_failed", analysis.reason, decisions=analysis.decisions)
            if d.failures >= self.spec.failure_limit:
                if self.spec.baseline is None:
                    self._pause(
                        Pause.FAILED_HELD,
                        f"no baseline to roll back to: {analysis.reason}",
                        decisions=analysis.decisions,
                    )
                elif not self.spec.auto_rollback:
                    self._pause(
                        Pause.FAILED_HELD,
                        f"automatic rollback is off: {analysis.reason}",
                        decisions=analysis.decisions,
                    )
                else:
                    self._rollback(analysis.reason, "", analysis.decisions)
            return True
        if verdict is Verdict.ERROR:
            self._pause(Pause.ANALYSIS_ERROR, analysis.reason, decisions=analysis.decisions)
            return True
        if verdict is Verdict.PASSED:
            d.failures = 0
        d.message = f"{self.phases[d.phase].name}: {analysis.reason}"
        d.updated_at = now
        return True

    def unloaded(self, version: int) -> None:
        """A version was unloaded from the predictors."""
        d = self._d
        if version in d.loaded:
            d.loaded.remove(version)
        if version in d.to_unload:
            d.to_unload.remove(version)
        if version == self.spec.version:
            d.warm_at = None
        if d.state not in FINISHED and version in self.route().versions():
            d.serial += 1  # the route needs it again: reload, then publish afresh
            d.revision = d.applied_revision = None

    # -- verbs -----------------------------------------------------------------------------------------------------

    def pause(self, actor: str, reason: str) -> None:
        """Holds the rollout at its current weights."""
        self._require({State.PENDING, State.PROGRESSING}, "pause")
        self._pause(Pause.MANUAL, reason or "paused", actor)

    def resume(self, actor: str, reason: str) -> None:
        """Continues a paused rollout."""
        self._require({State.PAUSED}, "resume")
        d = self._d
        kind = d.pause
        self._set(d.paused_from or State.PROGRESSING)
        d.pause = d.paused_from = None
        self._event("resumed", reason, actor=actor)
        now = self._clock()
        if kind is Pause.STEP_GATE:
            self._advance()
        elif kind is Pause.SWITCH_GATE:
            d.switch_approved = True
        elif kind is Pause.ACK_TIMEOUT and d.applied_revision is None:
            self._republish()
        else:
            d.hold_from, d.next_analysis_at = now, now

    def promote(self, actor: str, reason: str, *, full: bool = False) -> None:
        """Skips the current phase, or with `full` goes straight to the last one."""
        self._require({State.PROGRESSING, State.PAUSED}, "promote")
        d = self._d
        if self.spec.version not in d.loaded:
            raise RolloutError(f"promote: version {self.spec.version} is not loaded yet")
        if self._holding_switch():  # promoting a blue-green before its switch means: switch now
            d.switch_approved = d.switch_open = True
            self._set(State.PROGRESSING)
            d.pause = d.paused_from = None
            self._event("promoted", f"switch now: {reason}", actor=actor)
            return
        if d.state is State.PAUSED:
            self._set(State.PROGRESSING)
            d.pause = d.paused_from = None
        self._event("promoted", f"{'to full' if full else 'skip ' + self.phases[d.phase].name}: {reason}", actor=actor)
        if full and d.phase < len(self.phases) - 1:
            d.phase = len(self.phases) - 2
        self._advance()

    def abort(self, actor: str, reason: str) -> None:
        """Rolls back now."""
        self._require(ACTIVE, "abort")
        self._rollback(reason or "aborted", actor)

    def undo(self, actor: str, reason: str) -> None:
        """Returns traffic to the baseline: after success, or while active (then the same as abort)."""
        self._require(ACTIVE | {State.SUCCEEDED}, "undo")
        if self.spec.baseline is None:
            raise RolloutError("undo: there is no baseline version to return to")
        d = self._d
        if d.state is State.SUCCEEDED:
            d.to_unload = [v for v in d.to_unload if v != self.spec.baseline]
            d.finished_at = None
        self._rollback(reason or "undone", actor)

    def retry(self, actor: str, reason: str, *, gate_operation: str = "") -> None:
        """Starts a rolled-back or failed rollout again from its first phase; the only verb that restarts it.

        After failed gates the caller decides: `gate_operation` runs them again, none means the version passed
        since (a forced promotion) and the rollout goes on to load.
        """
        self._require({State.ROLLED_BACK, State.FAILED}, "retry")
        d = self._d
        d.attempt += 1
        d.phase, d.failures, d.last_analysis, d.ever_applied = 0, 0, None, False
        d.to_unload, d.finished_at = [], None
        d.switch_approved = d.switch_open = False
        d.unhealthy_since = None
        self._republish()
        self._set(State.PENDING if self.spec.version not in d.loaded else State.PROGRESSING)
        self._event("retried", reason, actor=actor)
        if d.gates == "failed":
            if gate_operation:
                self._start_gates(gate_operation)
            else:
                d.gates = "passed"
                self._event("gates_passed", f"version {self.spec.version} passed its gates since (forced)", actor=actor)

    def supersede(self, reason: str, keep_loaded: int | None = None) -> None:
        """Ends an active rollout because a new spec replaces it; the new rollout takes over the route."""
        self._require(ACTIVE | {State.ROLLING_BACK}, "supersede")
        d = self._d
        d.to_unload = [v for v in d.loaded if v == self.spec.version and v != keep_loaded]
        self._finish(State.ABORTED, "superseded", reason)

    # -- transitions -----------------------------------------------------------------------------------------------

    def _require(self, states: frozenset[State] | set[State], verb: str) -> None:
        if self._d.state not in states:
            raise RolloutError(f"{verb}: not possible while the rollout is {self._d.state.value}")

    def _start_gates(self, operation: str) -> None:
        d = self._d
        d.gate_operation, d.gates, d.gate_results = operation, "running", []
        d.message = f"promotion gates running as operation {operation}; the rollout starts once they pass"
        self._event("gates_started", d.message)

    def _complete_phase(self, reason: str, decisions: tuple[Decision, ...] = ()) -> None:
        self._event("phase_completed", f"{self.phases[self._d.phase].name}: {reason}", decisions=decisions)
        if self.phases[self._d.phase].pause_after and self._d.phase < len(self.phases) - 1:
            self._pause(Pause.STEP_GATE, f"{self.phases[self._d.phase].name} done; waiting for resume or promote")
            return
        self._advance()

    def _advance(self) -> None:
        d = self._d
        if d.phase >= len(self.phases) - 1:
            # A shadow never served: its own version goes. Otherwise the old version, kept warm until now, goes.
            gone = self.spec.version if self.spec.strategy is Strategy.SHADOW else self.spec.baseline
            d.to_unload = [v for v in d.loaded if v == gone]
            self._finish(State.SUCCEEDED, "succeeded", f"{self.spec.model} version {self.spec.version}: completed")
            return
        d.phase += 1
        self._republish(keep_analysis=not self.phases[d.phase].analysed)

    def _republish(self, *, keep_analysis: bool = False) -> None:
        d = self._d
        d.serial += 1
        d.revision = d.published_at = d.applied_at = d.applied_revision = None
        d.next_analysis_at = d.hold_from = None
        d.failures = 0
        if not keep_analysis:
            d.last_analysis = None

    def _rollback(self, reason: str, actor: str, decisions: tuple[Decision, ...] = ()) -> None:
        d = self._d
        self._republish(keep_analysis=True)  # the status keeps showing the decisions that caused it
        d.pause = d.paused_from = None
        self._set(State.ROLLING_BACK)
        d.message = reason
        self._event("rollback_started", reason, actor=actor, decisions=decisions)

    def _pause(self, kind: Pause, message: str, actor: str = "", decisions: tuple[Decision, ...] = ()) -> None:
        d = self._d
        d.paused_from = d.state if d.state is not State.PAUSED else d.paused_from
        d.pause = kind
        self._set(State.PAUSED)
        d.message = message
        self._event("paused", message, actor=actor, decisions=decisions)

    def _finish(self, state: State, kind: str, message: str) -> None:
        d = self._d
        self._set(state)
        d.message = message
        d.finished_at = self._clock()
        self._event(kind, message)

    def _set(self, state: State) -> None:
        self._d.state = state
        self._d.updated_at = self._clock()

    def _event(self, kind: str, reason: str, *, actor: str = "", decisions: tuple[Decision, ...] = ()) -> None:
        assert kind in EVENT_KINDS, f"rollout: event kind {kind!r} is not in EVENT_KINDS"
        d = self._d
        d.events.append(Event(self._clock(), kind, d.state, d.phase, reason, actor, decisions))
        d.updated_at = self._clock()

    def _route_text(self) -> str:
        r = self.route()
        live = ", ".join(f"v{v} {w:g}%" for v, w in sorted(r.weights.items())) or "no version"
        mirror = "".join(f", mirror v{v} {w:g}%" for v, w in sorted(r.mirror.items()))
        return live + mirror
