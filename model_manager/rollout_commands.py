"""What people do to a rollout: pause, resume, promote, abort, undo, retry, and supersede it with a new spec."""

from __future__ import annotations

from model_manager.actions import ACTIVE, Pause, State
from model_manager.rollout_core import RolloutCore, RolloutError


class RolloutCommands(RolloutCore):
    """The verbs; each raises `RolloutError` when it does not apply in the current state."""

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
