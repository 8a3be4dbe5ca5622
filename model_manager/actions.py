"""What a rollout asks the controller to do next, and the history it records."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from model_manager.analysis import AnalysisSpec, Decision
from model_manager.plans import Route


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
