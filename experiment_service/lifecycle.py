"""The status machine and how each request changes an experiment: plain functions from the stored experiment and
the request to the `Change` to commit. DRAFT -> RUNNING -> STOPPED -> DECIDED (RUNNING -> DECIDED stops it too)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

from google.protobuf.field_mask_pb2 import FieldMask

from chassis.errors import Aborted, FailedPrecondition, InvalidArgument
from experiment_service.store import Change, status_name, timestamp
from experiment_service.validation import validate
from fresco.api.experiments.v1 import experiment_pb2 as xpb

# Fields a caller may change; the others are the key (never) and what the service sets.
UPDATABLE: Final = (
    "hypothesis", "owner", "type", "model_name", "arms", "control_arm", "unit_type", "coverage", "salt", "targeting",
    "namespace", "metrics", "min_units_per_arm", "max_duration", "decision_rule", "statistics", "bandit", "labels",
)  # fmt: skip
# Fields whose change would move units between arms or out of the analysis: fixed once the experiment ran.
FIXED_ONCE_RUN: Final = ("salt", "unit_type", "type", "model_name")
SERVICE_SET: Final = (
    "status", "version", "phases", "created_at", "updated_at", "updated_by", "started_at", "stopped_at",
    "stop_reason", "decision",
)  # fmt: skip
RUNNING: Final = xpb.EXPERIMENT_STATUS_RUNNING


def weights(e: xpb.Experiment) -> tuple[float, ...]:
    """The arms' weights, in arm order."""
    return tuple(a.weight for a in e.arms)


def _check_version(current: xpb.Experiment, expected: int) -> None:
    if expected != current.version:
        raise Aborted(
            f"expected_version: the experiment is at version {current.version}, not {expected}; read it again and retry"
        )


def _check_status(current: xpb.Experiment, allowed: Sequence[int], verb: str) -> None:
    if current.status not in allowed:
        names = " or ".join(status_name(s) for s in allowed)
        raise FailedPrecondition(
            f"status: {verb} needs an experiment in {names}, {current.key!r} is {status_name(current.status)}"
        )


def _next(current: xpb.Experiment, identity: str, at_us: int) -> xpb.Experiment:
    e = xpb.Experiment()
    e.CopyFrom(current)
    e.version = current.version + 1
    e.updated_at.CopyFrom(timestamp(at_us))
    e.updated_by = identity
    return e


def new_experiment(request: xpb.Experiment, identity: str, at_us: int) -> xpb.Experiment:
    """The experiment to create from a request: the caller's configuration, DRAFT at version 1; validated."""
    e = xpb.Experiment()
    e.CopyFrom(request)
    for name in SERVICE_SET:
        e.ClearField(name)
    e.status = xpb.EXPERIMENT_STATUS_DRAFT
    e.version = 1
    e.created_at.CopyFrom(timestamp(at_us))
    e.updated_at.CopyFrom(timestamp(at_us))
    e.updated_by = identity
    validate(e)
    return e


def _arms_change(before: xpb.Experiment, after: xpb.Experiment) -> bool:
    return [(a.name, a.weight, a.model_version, dict(a.parameters)) for a in before.arms] != [
        (a.name, a.weight, a.model_version, dict(a.parameters)) for a in after.arms
    ]


def update(
    current: xpb.Experiment,
    patch: xpb.Experiment,
    paths: Sequence[str],
    expected_version: int,
    identity: str,
    at_us: int,
) -> Change:
    """The fields named by `paths` taken from `patch`; a change of a running experiment's arms starts a phase."""
    if not paths:
        raise InvalidArgument(f"update_mask.paths: expected some of {', '.join(UPDATABLE)}, got none")
    for i, path in enumerate(paths):
        if path not in UPDATABLE:
            why = (
                "is set by the service"
                if path in SERVICE_SET
                else "never changes"
                if path == "key"
                else "is not a field"
            )
            raise InvalidArgument(
                f"update_mask.paths[{i}]: {path[:80]!r} {why}; expected some of {', '.join(UPDATABLE)}"
            )
    _check_version(current, expected_version)
    _check_status(current, (xpb.EXPERIMENT_STATUS_DRAFT, RUNNING), "an update")
    e = _next(current, identity, at_us)
    # Named fields are replaced whole, lists and maps included (not appended to).
    FieldMask(paths=list(dict.fromkeys(paths))).MergeMessage(
        patch, e, replace_message_field=True, replace_repeated_field=True
    )
    if current.status != xpb.EXPERIMENT_STATUS_DRAFT:
        for name in FIXED_ONCE_RUN:
            if getattr(e, name) != getattr(current, name):
                raise FailedPrecondition(f"{name}: fixed once the experiment has run ({current.key!r} is RUNNING)")
    validate(e)
    detail = "changed " + ", ".join(dict.fromkeys(paths))
    new_phase = current.status == RUNNING and _arms_change(current, e)
    if new_phase:
        detail += f"; phase {len(current.phases) + 1} starts with weights {list(weights(e))}"
    return Change(
        e,
        expected_version,
        "update",
        identity,
        detail,
        at_us,
        end_phase=new_phase,
        new_phase=weights(e) if new_phase else None,
        publish=current.status == RUNNING,
    )


def start(current: xpb.Experiment, expected_version: int, identity: str, at_us: int) -> Change:
    """DRAFT -> RUNNING: phase 1 starts with the arms' weights and gateways assign it."""
    _check_version(current, expected_version)
    _check_status(current, (xpb.EXPERIMENT_STATUS_DRAFT,), "start")
    e = _next(current, identity, at_us)
    validate(e)
    e.status = RUNNING
    e.started_at.CopyFrom(timestamp(at_us))
    detail = f"started; phase 1 with weights {list(weights(e))}"
    return Change(e, expected_version, "start", identity, detail, at_us, new_phase=weights(e), publish=True)


def stop(current: xpb.Experiment, expected_version: int, reason: str, identity: str, at_us: int) -> Change:
    """RUNNING -> STOPPED: the phase ends and gateways stop assigning it."""
    _check_version(current, expected_version)
    _check_status(current, (RUNNING,), "stop")
    e = _next(current, identity, at_us)
    e.status = xpb.EXPERIMENT_STATUS_STOPPED
    e.stopped_at.CopyFrom(timestamp(at_us))
    e.stop_reason = reason
    return Change(e, expected_version, "stop", identity, f"stopped: {reason}", at_us, end_phase=True, publish=True)


def decide(
    current: xpb.Experiment, expected_version: int, record: xpb.DecisionRecord, identity: str, at_us: int
) -> Change:
    """RUNNING or STOPPED -> DECIDED, recording the decision (a running experiment stops first)."""
    _check_version(current, expected_version)
    _check_status(current, (RUNNING, xpb.EXPERIMENT_STATUS_STOPPED), "a decision")
    e = _next(current, identity, at_us)
    was_running = current.status == RUNNING
    if was_running:
        e.stopped_at.CopyFrom(timestamp(at_us))
        e.stop_reason = e.stop_reason or "decided"
    e.status = xpb.EXPERIMENT_STATUS_DECIDED
    e.decision.CopyFrom(record)
    e.decision.decided_at.CopyFrom(timestamp(at_us))
    e.decision.decided_by = identity
    action = xpb.DecisionAction.Name(record.action).removeprefix("DECISION_ACTION_")
    detail = (
        f"decided {action}"
        + (f" arm {record.arm}" if record.arm else "")
        + (f": {record.reason}" if record.reason else "")
    )
    return Change(e, expected_version, "decide", identity, detail, at_us, end_phase=was_running, publish=was_running)


def reweight(current: xpb.Experiment, phase: int, new: Sequence[float], identity: str, at_us: int) -> Change:
    """A running bandit's next allocation within its current phase: the arms take the new weights."""
    _check_status(current, (RUNNING,), "re-weighting")
    if current.type != xpb.EXPERIMENT_TYPE_BANDIT:
        raise FailedPrecondition(f"type: re-weighting needs a BANDIT experiment, {current.key!r} is an A/B test")
    now = current.phases[-1].number if current.phases else 0
    if phase != now:
        raise FailedPrecondition(f"phase: expected the current phase {now}, got {phase}")
    if len(new) != len(current.arms):
        raise InvalidArgument(f"weights: expected one per arm ({len(current.arms)}), got {len(new)}")
    if not all(math.isfinite(w) and w >= 0 for w in new) or not sum(new) > 0:
        raise InvalidArgument("weights: expected non-negative finite weights with a positive total")
    e = _next(current, identity, at_us)
    for arm, weight in zip(e.arms, new, strict=True):
        arm.weight = float(weight)
    detail = f"re-weighted phase {phase}: {[round(w, 4) for w in new]}"
    return Change(e, current.version, "reweight", identity, detail, at_us, new_allocation=weights(e), publish=True)
