"""The rollout's record and clock, what it reads, and the transitions every other part of the state machine uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from model_manager.actions import Event, Pause, RolloutRecord, State
from model_manager.analysis import Analysis, Decision
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


def fmt_minutes(seconds: float) -> str:
    """A duration for messages: whole minutes, or seconds under a minute."""
    return f"{seconds / 60:.0f} m" if seconds >= 60 else f"{seconds:.0f} s"


class RolloutCore:
    """The state of one rollout of one model version; every method reads the time from the injected clock."""

    def __init__(self, data: RolloutRecord, clock: Clock) -> None:
        self._d = data
        self._clock = clock
        self.phases: tuple[Phase, ...] = plan(data.spec)

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
