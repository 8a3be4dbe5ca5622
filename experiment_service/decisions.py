"""Decisions: the recommendation of the current results, or an override with a reason; shipping a treatment asks
the model manager to promote the arm's version through its gates first, and only then is the experiment decided."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Protocol

from chassis.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from experiment_service.promoter import Shipment
from experiment_service.results import Results
from fresco.api.experiments.v1 import experiment_pb2 as epb
from fresco.api.experiments.v1 import results_pb2 as rpb

SHIP = epb.DECISION_ACTION_SHIP_TREATMENT
KEEP = epb.DECISION_ACTION_KEEP_CONTROL
CONTINUE = epb.DECISION_ACTION_CONTINUE
DECIDABLE = (epb.EXPERIMENT_STATUS_RUNNING, epb.EXPERIMENT_STATUS_STOPPED)
MAX_REASON = 4000  # the model manager keeps at most 4096 characters of a reason


class Catalog(Protocol):
    """The parts of the experiment catalog decisions use."""

    async def get(self, key: str) -> epb.Experiment | None:
        """The experiment, or None."""
        ...

    async def decide(
        self, key: str, expected_version: int, record: epb.DecisionRecord, identity: str
    ) -> epb.Experiment:
        """RUNNING or STOPPED -> DECIDED with the record."""
        ...


class Promoter(Protocol):
    """Ships a model version through the model manager's gates and a rollout."""

    async def promote(self, model_name: str, version: int, reason: str) -> Shipment:
        """Start the gates and the rollout; errors are the manager's, mapped to domain errors."""
        ...


def _action_name(action: int) -> str:
    return epb.DecisionAction.Name(action).removeprefix("DECISION_ACTION_")  # type: ignore[arg-type]


def promotion_reason(experiment: epb.Experiment, results: rpb.ExperimentResults, arm: str, why: str) -> str:
    """Why the version is promoted, citing the experiment, its phase and each metric's lift for the arm."""
    lifts = []
    for metric in results.metrics:
        for c in metric.comparisons:
            if c.arm_name == arm:
                lo, hi = c.sequential_interval.lower, c.sequential_interval.upper
                lifts.append(f"{metric.metric_name} {c.relative_lift:+.2%} [{lo:+.2%}, {hi:+.2%}]")
    units = ", ".join(f"{a.arm_name} {a.units}" for a in results.arms)
    text = (
        f"experiment {experiment.key} (version {experiment.version}, phase {results.phase}) ships arm {arm} "
        f"against {results.control_arm}: {'; '.join(lifts) or 'no metrics'}; units {units}; {why}"
    )
    return text[:MAX_REASON]


class Decisions:
    """DecideExperiment: take the recommendation or an override, promote a shipped version, record the decision."""

    def __init__(self, catalog: Catalog, results: Results, promoter: Promoter | None) -> None:
        self.catalog = catalog
        self.results = results
        self.promoter = promoter
        self._deciding: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def decide(
        self, key: str, expected_version: int, action: int, arm: str, reason: str, identity: str
    ) -> tuple[epb.Experiment, rpb.ExperimentResults]:
        """The decided experiment and the results the decision was taken on.

        One decision of an experiment at a time (a second one then finds it DECIDED), and shielded: a caller that goes
        away after the model manager started shipping must not leave the experiment running without its decision."""
        return await asyncio.shield(self._decide_one(key, expected_version, action, arm, reason, identity))

    async def _decide_one(
        self, key: str, expected_version: int, action: int, arm: str, reason: str, identity: str
    ) -> tuple[epb.Experiment, rpb.ExperimentResults]:
        async with self._deciding[key]:
            return await self._decide(key, expected_version, action, arm, reason, identity)

    async def _decide(
        self, key: str, expected_version: int, action: int, arm: str, reason: str, identity: str
    ) -> tuple[epb.Experiment, rpb.ExperimentResults]:
        if not key:
            raise InvalidArgument("key: expected an experiment key")
        if action not in epb.DecisionAction.values():
            raise InvalidArgument(f"action: expected SHIP_TREATMENT, KEEP_CONTROL or unset, got {action}")
        if action == CONTINUE:
            raise InvalidArgument("action: CONTINUE is not a decision; leave the experiment running instead")
        experiment = await self.catalog.get(key)
        if experiment is None:
            raise NotFound(f"key: no experiment {key!r}")
        # Checked before anything is promoted: a stale or finished experiment must not ship a version.
        if experiment.version != expected_version:
            raise Aborted(
                f"expected_version: experiment {key!r} is at version {experiment.version}, not {expected_version}; "
                "read it again"
            )
        if experiment.status not in DECIDABLE:
            status = epb.ExperimentStatus.Name(experiment.status).removeprefix("EXPERIMENT_STATUS_")
            raise FailedPrecondition(f"status: experiment {key!r} is {status}; a decision needs RUNNING or STOPPED")
        results = await self.results.analyse(experiment)
        recommended = results.decision
        overridden = False
        if action == epb.DECISION_ACTION_UNSPECIFIED:
            if recommended.action not in (SHIP, KEEP):
                raise FailedPrecondition(
                    f"action: the results recommend {_action_name(recommended.action)} ({recommended.reason}); "
                    "set an action and a reason to decide anyway"
                )
            action, arm = recommended.action, recommended.arm if recommended.action == SHIP else ""
        else:
            arm = self._arm(experiment, action, arm, recommended)
            overridden = action != recommended.action or (action == SHIP and arm != recommended.arm)
            if overridden and not reason.strip():
                raise InvalidArgument(
                    f"reason: {_action_name(action)} overrides the recommendation "
                    f"{_action_name(recommended.action)} ({recommended.reason}); give a reason"
                )
        record = epb.DecisionRecord(
            action=epb.DecisionAction.ValueType(action),
            arm=arm,
            reason=reason or recommended.reason,
            phase=results.phase,
            overridden=overridden,
        )
        if action == SHIP:
            shipped = await self._promote(experiment, results, arm, record.reason)
            record.promotion_operation, record.rollout_id = shipped.operation_id, shipped.rollout_id
        try:
            decided = await self.catalog.decide(key, expected_version, record, identity)
        except Aborted as err:
            if not record.rollout_id:
                raise
            # A change (a bandit re-weighting) won the race after the promotion started: the promotion stands,
            # so the decision is recorded on the current version rather than left without its experiment.
            current = await self.catalog.get(key)
            if current is None or current.status not in DECIDABLE:
                raise Aborted(f"{err}; the rollout {record.rollout_id} was started already") from None
            decided = await self.catalog.decide(key, current.version, record, identity)
        return decided, results

    @staticmethod
    def _arm(experiment: epb.Experiment, action: int, arm: str, recommended: rpb.Decision) -> str:
        if action != SHIP:
            if arm:
                raise InvalidArgument(f"arm: only SHIP_TREATMENT names an arm, got {arm!r} with KEEP_CONTROL")
            return ""
        control = experiment.control_arm or experiment.arms[0].name
        treatments = [a.name for a in experiment.arms if a.name != control]
        if not arm:
            if recommended.action == SHIP and recommended.arm:
                return recommended.arm
            if len(treatments) == 1:
                return treatments[0]
            raise InvalidArgument(f"arm: expected the treatment arm to ship, one of {treatments}")
        if arm not in treatments:
            raise InvalidArgument(f"arm: expected a treatment arm of {experiment.key!r} ({treatments}), got {arm!r}")
        return arm

    async def _promote(
        self, experiment: epb.Experiment, results: rpb.ExperimentResults, arm: str, why: str
    ) -> Shipment:
        chosen = next(a for a in experiment.arms if a.name == arm)
        if not experiment.model_name or not chosen.model_version:
            return Shipment("", "")  # a parameter-only arm: nothing for the model manager to promote
        if self.promoter is None:
            raise FailedPrecondition(
                f"arm: shipping {arm!r} promotes version {chosen.model_version} of {experiment.model_name}, but "
                "this service has no --model-manager-address"
            )
        reason = promotion_reason(experiment, results, arm, why)
        return await self.promoter.promote(experiment.model_name, chosen.model_version, reason)
