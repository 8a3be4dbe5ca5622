"""What a finished rollout changes in the registry: a success puts its version in production, an undo puts the
baseline back. Through the registry's own lifecycle, audited under the controller's identity."""

from __future__ import annotations

import logging

from chassis.errors import FrescoError
from model_manager.lifecycle import Stage
from model_manager.plans import Strategy
from model_manager.records import default_score_output
from model_manager.registry import Registry
from model_manager.rollout import Rollout
from model_manager.windows import Histogram, WindowError

log = logging.getLogger(__name__)


def _to_production(registry: Registry, model: str, version: int, identity: str, reason: str) -> None:
    stage = registry.get_version(model, version).stage
    if stage is Stage.PRODUCTION:
        return
    if stage is Stage.ARCHIVED:  # back into production goes through candidate, like any other version
        registry.set_stage(model, version, Stage.CANDIDATE, identity, reason)
    registry.set_stage(model, version, Stage.PRODUCTION, identity, reason)


def promote_in_registry(registry: Registry, rollout: Rollout, identity: str) -> None:
    """A succeeded canary or blue-green puts its version in production (archiving the previous one)."""
    spec = rollout.spec
    if spec.strategy is Strategy.SHADOW:
        return  # a shadow never served: production stays as it was
    try:
        _to_production(registry, spec.model, spec.version, identity, f"rollout {rollout.rollout_id} succeeded")
    except FrescoError as err:
        log.warning("rollout %s succeeded but its version stays out of production: %s", rollout.rollout_id, err)


def restore_baseline(registry: Registry, rollout: Rollout, identity: str) -> None:
    """A rollback of a version that had reached production (an undo) puts the baseline back in production."""
    spec = rollout.spec
    if spec.baseline is None:
        return
    try:
        if registry.get_model(spec.model).production_version != spec.version:
            return
        _to_production(registry, spec.model, spec.baseline, identity, f"rollout {rollout.rollout_id} rolled back")
    except FrescoError as err:
        log.warning("rollout %s rolled back but the baseline stays out of production: %s", rollout.rollout_id, err)


def score_reference(registry: Registry, model: str, version: int, output: str) -> Histogram | None:
    """The training histogram of a version's score output (`output`, or by default its first output with one), for
    the PSI check.

    Training statistics list the score output beside the input features when it was summarised at training.
    """
    try:
        record = registry.get_version(model, version)
    except FrescoError:
        return None
    name = output or default_score_output(record)
    for stat in record.training_statistics:
        if stat.feature_name == name and stat.numeric.HasField("histogram"):
            h = stat.numeric.histogram
            try:
                return Histogram(tuple(h.bucket_bounds), tuple(h.bucket_counts))
            except WindowError:
                return None
    return None


def score_bins(registry: Registry, model: str, version: int, output: str) -> tuple[str, tuple[float, ...]]:
    """The score output's name (`output`, or by default the version's first output with a training histogram)
    and the bucket bounds of that histogram; no bounds when the version has none."""
    try:
        record = registry.get_version(model, version)
    except FrescoError:
        return output, ()
    name = output or default_score_output(record)
    reference = score_reference(registry, model, version, name)
    return name, (reference.bounds if reference is not None else ())
