"""The gate state machine of a model version: which stage may follow which, and a clear refusal otherwise."""

from __future__ import annotations

from enum import StrEnum

from chassis.errors import FailedPrecondition


class Stage(StrEnum):
    """The lifecycle stage of a version: registered → validating → candidate → production → archived, or rejected."""

    REGISTERED = "registered"
    VALIDATING = "validating"
    CANDIDATE = "candidate"
    PRODUCTION = "production"
    ARCHIVED = "archived"
    REJECTED = "rejected"


# Validating may fall back to registered when a gate run is abandoned (an error, not a verdict), so it can run again.
# Archived may come back as a candidate: an undo needs the previous version, and re-entering production goes through
# candidate like any other. A rejected version may be validated again (gates changed, or a forced re-run).
TRANSITIONS: dict[Stage, tuple[Stage, ...]] = {
    Stage.REGISTERED: (Stage.VALIDATING, Stage.REJECTED, Stage.ARCHIVED),
    Stage.VALIDATING: (Stage.CANDIDATE, Stage.REJECTED, Stage.REGISTERED),
    Stage.CANDIDATE: (Stage.PRODUCTION, Stage.VALIDATING, Stage.REJECTED, Stage.ARCHIVED),
    Stage.PRODUCTION: (Stage.ARCHIVED,),
    Stage.ARCHIVED: (Stage.CANDIDATE,),
    Stage.REJECTED: (Stage.VALIDATING, Stage.ARCHIVED),
}


def allowed(source: Stage, target: Stage) -> bool:
    """Whether a version in `source` may move to `target`."""
    return target in TRANSITIONS[source]


def check_transition(what: str, source: Stage, target: Stage) -> None:
    """Refuse a move the state machine does not allow, naming the stages it does allow from `source`."""
    if allowed(source, target):
        return
    options = " or ".join(stage.value for stage in TRANSITIONS[source])
    raise FailedPrecondition(
        f"stage: {what} is {source.value}; from {source.value} it can move to {options}, not {target.value}"
    )
