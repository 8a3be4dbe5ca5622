"""Assigning units from the slim configuration: the same code in the gateway (on the request path, no
hop) and in the experiment service's `Assign`. Pure hashing; bandits confirm through a `StickyArms` store."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Protocol

from fresco.api.common.v1 import values_pb2
from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.experiments.assignment import BUCKETS, arm_bounds, bucket
from fresco.experiments.targeting import matches


class StickyArms(Protocol):
    """Where a bandit unit's first arm is kept (`fresco.experiments.sticky` has the Redis and SQLite stores)."""

    async def claim(
        self, experiment_key: str, phase: int, unit_type: str, proposals: Mapping[str, tuple[str, int]]
    ) -> dict[str, tuple[str, int]]:
        """For each unit id, the (arm, allocation) stored first, storing the proposal when there is none."""
        ...


@dataclass(frozen=True)
class Assigned:
    """One unit's place in one experiment."""

    experiment_key: str
    experiment_version: int
    phase: int
    reason: int  # apb.AssignmentReason
    unit_type: str
    unit_id: str = ""
    arm_name: str = ""
    model_version: int = 0
    parameters: Mapping[str, str] = field(default_factory=dict)
    allocation: int = 0
    sticky: bool = False  # a bandit's arm: the first one stored for the unit wins (see `settle`)

    @property
    def assigned(self) -> bool:
        """Whether the unit is in the experiment."""
        return self.reason == apb.ASSIGNMENT_REASON_ASSIGNED

    def to_proto(self) -> apb.Assignment:
        """The wire form."""
        return apb.Assignment(
            experiment_key=self.experiment_key,
            experiment_version=self.experiment_version,
            phase=self.phase,
            reason=self.reason,  # type: ignore[arg-type]
            arm_name=self.arm_name,
            model_version=self.model_version,
            parameters=dict(self.parameters),
            allocation=self.allocation,
        )


class _Compiled:
    """One experiment's configuration with everything assigning reads worked out once (seeds, ranges, each arm's
    assignment), so a request only hashes and builds one `Assigned` per experiment."""

    def __init__(self, config: apb.ExperimentConfig) -> None:
        self.config = config
        ns = config.namespace if config.HasField("namespace") and config.namespace.id else None
        self.unit_type = config.unit_type
        self.targeting = list(config.targeting)
        self.bounds = arm_bounds([arm.weight for arm in config.arms])
        self.coverage_end = round(config.coverage * BUCKETS)
        self.namespace_seed = "ns:" + ns.id if ns else ""
        self.namespace_range = (ns.start, ns.end) if ns else (0, BUCKETS)
        self.coverage_seed = "cov:" + config.salt
        self.arm_seed = "arm:" + config.salt
        self.sticky = config.type == xpb.EXPERIMENT_TYPE_BANDIT
        self.arms = {arm.name: arm for arm in config.arms}
        # Parameters read-only: one mapping serves every assignment to the arm.
        self._ordered = [(arm.name, arm.model_version, MappingProxyType(dict(arm.parameters))) for arm in config.arms]
        self._left_out = {  # a reason, for a unit left out, with its id filled in per request
            reason: Assigned(config.key, config.version, config.phase, reason, config.unit_type)
            for reason in (
                apb.ASSIGNMENT_REASON_MISSING_UNIT_ID,
                apb.ASSIGNMENT_REASON_TARGETING_MISMATCH,
                apb.ASSIGNMENT_REASON_OUTSIDE_NAMESPACE,
                apb.ASSIGNMENT_REASON_OUTSIDE_COVERAGE,
            )
        }

    def assign(self, unit_ids: Mapping[str, str], attributes: Mapping[str, values_pb2.Value]) -> Assigned:
        unit = unit_ids.get(self.unit_type, "")
        if not unit:
            return self._left_out[apb.ASSIGNMENT_REASON_MISSING_UNIT_ID]
        if self.targeting and not matches(self.targeting, attributes):
            return replace(self._left_out[apb.ASSIGNMENT_REASON_TARGETING_MISMATCH], unit_id=unit)
        if self.namespace_seed:
            start, end = self.namespace_range
            if not start <= bucket(self.namespace_seed, unit) < end:
                return replace(self._left_out[apb.ASSIGNMENT_REASON_OUTSIDE_NAMESPACE], unit_id=unit)
        if bucket(self.coverage_seed, unit) >= self.coverage_end:
            return replace(self._left_out[apb.ASSIGNMENT_REASON_OUTSIDE_COVERAGE], unit_id=unit)
        position = bucket(self.arm_seed, unit)
        index = next(i for i, end in enumerate(self.bounds) if position < end)
        return self._assigned(unit, index, self.config.allocation)

    def _assigned(self, unit: str, index: int, allocation: int) -> Assigned:
        name, version, parameters = self._ordered[index]
        c = self.config
        return Assigned(
            c.key, c.version, c.phase, apb.ASSIGNMENT_REASON_ASSIGNED, self.unit_type, unit, name, version,
            parameters, allocation, self.sticky,
        )  # fmt: skip

    def with_arm(self, assigned: Assigned, name: str, allocation: int) -> Assigned | None:
        """`assigned` moved to the arm called `name` (a bandit unit's stored arm); None when the arm is gone."""
        index = next((i for i, (arm, _, _) in enumerate(self._ordered) if arm == name), None)
        return None if index is None else self._assigned(assigned.unit_id, index, allocation)


class Evaluator:
    """Assigns units from one configuration revision. Immutable: a new revision builds a new evaluator."""

    def __init__(self, config: apb.AssignmentConfig | None = None) -> None:
        self.config = config or apb.AssignmentConfig()
        self.revision = self.config.revision
        self._compiled = {e.key: _Compiled(e) for e in sorted(self.config.experiments, key=lambda e: e.key)}
        self._by_model: dict[str, list[_Compiled]] = {}
        for compiled in self._compiled.values():
            self._by_model.setdefault(compiled.config.model_name, []).append(compiled)

    def __len__(self) -> int:
        return len(self._compiled)

    def keys(self) -> list[str]:
        """The running experiments' keys, sorted."""
        return list(self._compiled)

    def assign(
        self,
        unit_ids: Mapping[str, str],
        attributes: Mapping[str, values_pb2.Value],
        model_name: str | None = None,
        keys: Collection[str] = (),
    ) -> list[Assigned]:
        """The unit's assignment in every running experiment (on `model_name`, among `keys`), by key."""
        every = list(self._compiled.values())
        candidates = every if model_name is None else self._by_model.get(model_name, [])
        if keys:
            candidates = [c for c in candidates if c.config.key in keys]
        if not candidates:
            return []
        return [c.assign(unit_ids, attributes) for c in candidates]

    def arm(self, key: str, name: str) -> xpb.Arm | None:
        """An experiment's arm by name, as configured."""
        compiled = self._compiled.get(key)
        return compiled.arms.get(name) if compiled else None

    async def settle(self, assigned: Sequence[Assigned], sticky: StickyArms) -> list[Assigned]:
        """`assigned` with every bandit arm replaced by the one stored first for its unit (one store call per
        experiment), so re-weighting never moves a unit."""
        groups: dict[tuple[str, int, str], dict[str, tuple[str, int]]] = {}
        for a in assigned:
            if a.sticky and a.assigned:
                groups.setdefault((a.experiment_key, a.phase, a.unit_type), {})[a.unit_id] = (a.arm_name, a.allocation)
        if not groups:
            return list(assigned)
        stored = {group: await sticky.claim(*group, proposals) for group, proposals in groups.items()}
        out = []
        for a in assigned:
            if a.sticky and a.assigned:
                arm_name, allocation = stored[(a.experiment_key, a.phase, a.unit_type)][a.unit_id]
                a = self._compiled[a.experiment_key].with_arm(a, arm_name, allocation) or a
            out.append(a)
        return out


def config_of(experiment: xpb.Experiment, allocation: int = 0) -> apb.ExperimentConfig:
    """The slim configuration of a running experiment: what assigning needs, nothing else."""
    config = apb.ExperimentConfig(
        key=experiment.key,
        version=experiment.version,
        phase=experiment.phases[-1].number if experiment.phases else 1,
        type=experiment.type,
        model_name=experiment.model_name,
        unit_type=experiment.unit_type,
        salt=experiment.salt or experiment.key,
        coverage=experiment.coverage,
        targeting=experiment.targeting,
        arms=[
            xpb.Arm(name=a.name, weight=a.weight, model_version=a.model_version, parameters=a.parameters)
            for a in experiment.arms
        ],
        allocation=allocation,
    )
    if experiment.HasField("namespace") and experiment.namespace.id:
        config.namespace.CopyFrom(experiment.namespace)
    return config
