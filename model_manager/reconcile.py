"""Applying a desired rollout spec to the current rollout of a model, and running an analysis that is due."""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from model_manager.actions import ACTIVE, Action, Do, State
from model_manager.analysis import Analysis, analyse
from model_manager.drift_monitor import VersionBasis
from model_manager.plans import RolloutSpec
from model_manager.rollout import Clock, Rollout, RolloutError
from model_manager.windows import Histogram, WindowLedger


class Outcome(enum.Enum):
    """What applying a spec did."""

    STARTED = "started"
    UNCHANGED = "unchanged"
    HELD = "held"
    SUPERSEDED = "superseded"


@dataclass(frozen=True)
class Applied:
    """The rollout in force after an apply, what happened, and one line saying so."""

    outcome: Outcome
    rollout: Rollout
    message: str
    superseded: Rollout | None = None


def apply(current: Rollout | None, spec: RolloutSpec, generation: int, clock: Clock, *, rollout_id: str) -> Applied:
    """Brings a model's rollout to `spec` at `generation`; `rollout_id` names a rollout if one is started.

    The same spec applied again never restarts a rollout: one that was rolled back (or failed) stays so,
    and says at which generation; only `Rollout.retry` starts it again. A changed spec supersedes an
    active rollout.
    """
    if current is None:
        return Applied(Outcome.STARTED, Rollout.start(rollout_id, spec, generation, clock), "started")
    if current.spec.model != spec.model:
        raise ValueError(f"model: the current rollout is of {current.spec.model!r}, not {spec.model!r}")
    if generation < current.generation:
        raise RolloutError(f"generation: {generation} is older than the rollout's generation {current.generation}")
    if spec == current.spec:
        if current.state is State.ROLLED_BACK:
            said = current.message  # already "rolled back at generation N: why"
        elif current.state is State.ROLLING_BACK:
            said = f"rolling back at generation {current.generation}: {current.message}"
        elif current.state is State.FAILED:
            said = f"failed at generation {current.generation}: {current.message}"
        else:
            return Applied(Outcome.UNCHANGED, current, f"unchanged at generation {current.generation}")
        return Applied(Outcome.HELD, current, f"{said}; retry starts it again")
    keep = spec.version if spec.version in current.loaded else None
    superseded = None
    if current.state in ACTIVE | {State.ROLLING_BACK}:
        current.supersede(f"superseded by generation {generation}", keep_loaded=keep)
        superseded = current
    new = Rollout.start(rollout_id, spec, generation, clock)
    if keep is not None:
        new.loaded_version(keep)
    if superseded is not None:
        return Applied(Outcome.SUPERSEDED, new, f"superseded rollout {current.rollout_id}", superseded)
    return Applied(Outcome.STARTED, new, "started")


def run_analysis(
    action: Action,
    ledger: WindowLedger,
    now: float,
    reference: Histogram | None = None,
    drift_basis: VersionBasis | None = None,
) -> Analysis:
    """Runs the ANALYSE action on the windows reported under the step's route revision or later (with their value
    sketches when the feature drift check runs, judged against `drift_basis`).

    The revision, not the clock, scopes the data: every window it selects was served with the step's
    weights, and the baseline's windows under the same revisions ran at the same time.
    """
    if action.do is not Do.ANALYSE or action.version is None or action.analysis is None:
        raise ValueError("action: expected an ANALYSE action")
    rev = action.revision or 0
    sketches = action.analysis.max_feature_psi is not None
    cand = ledger.merged(
        action.model, action.version, min_revision=rev, until=now, mirrored=action.mirrored, sketches=sketches
    )
    if action.with_mirror and not action.mirrored:
        mirrored = ledger.merged(action.model, action.version, min_revision=rev, until=now, mirrored=True)
        cand = replace(cand, shadow=mirrored.shadow)
    base = None
    if action.baseline is not None:
        base = ledger.merged(action.model, action.baseline, min_revision=rev, until=now)
    return analyse(cand, base, action.analysis, now=now, reference=reference, drift_basis=drift_basis)
