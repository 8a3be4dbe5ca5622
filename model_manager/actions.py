"""What a rollout asks the controller to do next, the history it records, and the record it persists."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from model_manager.analysis import Analysis, AnalysisSpec, Decision
from model_manager.plans import RolloutSpec, Route


class State(enum.Enum):
    """Where a rollout is."""

    PENDING = "PENDING"
    PROGRESSING = "PROGRESSING"
    PAUSED = "PAUSED"
    ROLLING_BACK = "ROLLING_BACK"
    SUCCEEDED = "SUCCEEDED"
    ROLLED_BACK = "ROLLED_BACK"
    FAILED = "FAILED"
    ABORTED = "ABORTED"


ACTIVE = frozenset({State.PENDING, State.PROGRESSING, State.PAUSED})
FINISHED = frozenset({State.SUCCEEDED, State.ROLLED_BACK, State.FAILED, State.ABORTED})


class Pause(enum.Enum):
    """Why a rollout is paused, which decides what resuming does."""

    MANUAL = "manual"
    STEP_GATE = "step_gate"
    HOLD_LIMIT = "hold_limit"
    ANALYSIS_ERROR = "analysis_error"
    FAILED_HELD = "failed_held"
    ACK_TIMEOUT = "ack_timeout"
    LOAD_FAILED = "load_failed"
    SWITCH_GATE = "switch_gate"


class Do(enum.Enum):
    """Kinds of next action."""

    LOAD = "load"
    PUBLISH = "publish"
    AWAIT_ACK = "await_ack"
    ANALYSE = "analyse"
    WAIT = "wait"
    UNLOAD = "unload"
    PAUSED = "paused"
    NOTHING = "nothing"


@dataclass(frozen=True)
class Action:
    """The next thing the controller should do; which fields are set depends on `do`."""

    do: Do
    model: str = ""
    version: int | None = None
    route: Route | None = None
    serial: int = 0
    revision: int | None = None
    until: float | None = None
    phase: int = 0
    since: float | None = None
    baseline: int | None = None
    mirrored: bool = False
    with_mirror: bool = False
    analysis: AnalysisSpec | None = None
    reason: str = ""


@dataclass(frozen=True)
class Event:
    """One entry of the rollout's history, with the decisions behind it."""

    at: float
    kind: str
    state: State
    phase: int
    reason: str = ""
    actor: str = ""
    decisions: tuple[Decision, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "at": self.at,
            "kind": self.kind,
            "state": self.state.value,
            "phase": self.phase,
            "reason": self.reason,
            "actor": self.actor,
            "decisions": [d.to_dict() for d in self.decisions],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Event:
        """The inverse of `to_dict`."""
        return cls(
            d["at"], d["kind"], State(d["state"]), d["phase"], d["reason"], d["actor"],
            tuple(Decision.from_dict(x) for x in d["decisions"]),
        )  # fmt: skip


@dataclass
class RolloutRecord:
    """Everything a rollout persists; `Rollout` is its behaviour."""

    rollout_id: str
    spec: RolloutSpec
    generation: int
    state: State
    created_at: float
    attempt: int = 1
    phase: int = 0
    loaded: list[int] = field(default_factory=list)
    to_unload: list[int] = field(default_factory=list)
    serial: int = 1
    revision: int | None = None
    published_at: float | None = None
    applied_at: float | None = None
    applied_revision: int | None = None
    ever_applied: bool = False
    next_analysis_at: float | None = None
    hold_from: float | None = None
    failures: int = 0
    last_analysis: Analysis | None = None
    pause: Pause | None = None
    paused_from: State | None = None
    message: str = ""
    updated_at: float = 0.0
    finished_at: float | None = None
    events: list[Event] = field(default_factory=list)
    # Promotion gates run before any load: their operation, "running" | "passed" | "failed", and opaque results.
    gate_operation: str = ""
    gates: str = ""
    gate_results: list[dict[str, Any]] = field(default_factory=list)
    warm_at: float | None = None  # when the new version was first reported loaded and warm
    switch_approved: bool = False  # a blue-green manual switch was resumed (or promoted)
    switch_open: bool = False  # the blue-green switch may go: warm long enough and approved if it must be
    unhealthy_since: float | None = None  # the new version has had no healthy endpoint since then

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["spec"] = self.spec.to_dict()
        out["state"] = self.state.value
        out["loaded"] = list(self.loaded)
        out["to_unload"] = list(self.to_unload)
        out["last_analysis"] = None if self.last_analysis is None else self.last_analysis.to_dict()
        out["pause"] = None if self.pause is None else self.pause.value
        out["paused_from"] = None if self.paused_from is None else self.paused_from.value
        out["events"] = [e.to_dict() for e in self.events]
        out["gate_results"] = [dict(r) for r in self.gate_results]
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> RolloutRecord:
        """The inverse of `to_dict`."""
        args = dict(raw)
        args["spec"] = RolloutSpec.from_dict(raw["spec"])
        args["state"] = State(raw["state"])
        args["loaded"] = list(raw["loaded"])
        args["to_unload"] = list(raw["to_unload"])
        args["last_analysis"] = None if raw["last_analysis"] is None else Analysis.from_dict(raw["last_analysis"])
        args["pause"] = None if raw["pause"] is None else Pause(raw["pause"])
        args["paused_from"] = None if raw["paused_from"] is None else State(raw["paused_from"])
        args["events"] = [Event.from_dict(e) for e in raw["events"]]
        return cls(**args)
