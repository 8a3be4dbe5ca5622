"""The rollout state machine: plain data driven by events, verbs and an injected clock.

A controller loops on `poll()`, which applies what the clock says is due and returns the one next
action (load, publish a route, wait for its acknowledgement, analyse, wait, unload, or a pause that
needs a person), and feeds back what happened: `loaded_version`, `load_failed`, `published`, `acknowledged`,
`observe` (an analysis), `unloaded`. A phase counts as applied only once the gateways have
acknowledged the route revision that carries it, and its analysis reads only windows reported under
that revision or later. The whole state is a JSON-ready dict, so it can be stored and resumed.

The class is put together from `rollout_core` (record, reads, transitions), `rollout_phases` (the loop),
`rollout_events` (what the controller feeds back) and `rollout_commands` (what people do).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from model_manager.actions import RolloutRecord, State
from model_manager.plans import RolloutSpec
from model_manager.rollout_commands import RolloutCommands
from model_manager.rollout_core import EVENT_KINDS, Clock, RolloutError
from model_manager.rollout_events import RolloutEvents
from model_manager.rollout_phases import RolloutPhases

__all__ = ["EVENT_KINDS", "Clock", "Rollout", "RolloutError"]


class Rollout(RolloutCommands, RolloutEvents, RolloutPhases):
    """One rollout of one model version; every method reads the time from the injected clock."""

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
