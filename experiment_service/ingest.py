"""Exposure and outcome batches: each row checked against its experiment (refused with a reason naming the field),
the rest recorded in the statistics store experiment by experiment, and the batch answered row by row."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from experiment_service.stats_store import (
    MAX_AMOUNT,
    ExposureRow,
    OutcomeRow,
    StatsPlan,
    StatsWriter,
    Verdict,
    to_us,
    unit_key,
)
from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_pb2 as epb
from fresco.api.experiments.v1 import experiment_service_pb2 as spb
from fresco.experiments.exposure import exposure_id

Row = TypeVar("Row")  # a row as received
Checked = TypeVar("Checked")  # the row once checked

ExperimentLookup = Callable[[str], Awaitable[epb.Experiment | None]]
AllocationLookup = Callable[[str, int], Awaitable[Mapping[int, object]]]
Clock = Callable[[], datetime]
R = apb.RejectionReason
PLAN_CACHE = 1024
MAX_TEXT = 512  # longest id, key, unit or event accepted: bounds what one row can store


class Refused(Exception):
    """One row refused, with its reason and a detail naming the field."""

    def __init__(self, reason: R.ValueType, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _now() -> datetime:
    return datetime.now(UTC)


def _required(row: apb.Exposure | apb.Outcome, fields: Sequence[str]) -> None:
    for name in fields:
        value = getattr(row, name)
        if not value:
            raise Refused(R.REJECTION_REASON_MISSING_FIELD, f"{name}: required, got an empty value")
        if len(value) > MAX_TEXT:
            raise Refused(R.REJECTION_REASON_MISSING_FIELD, f"{name}: expected at most {MAX_TEXT} characters")


def phase_at(experiment: epb.Experiment, at: datetime) -> int:
    """The number of the phase in force at `at`, or 0 when the experiment was not running then."""
    if experiment.status in (epb.EXPERIMENT_STATUS_UNSPECIFIED, epb.EXPERIMENT_STATUS_DRAFT):
        return 0
    if experiment.HasField("stopped_at") and at >= experiment.stopped_at.ToDatetime(UTC):
        return 0
    for phase in sorted(experiment.phases, key=lambda p: p.number, reverse=True):
        if phase.started_at.ToDatetime(UTC) <= at:
            ended = phase.HasField("ended_at") and at >= phase.ended_at.ToDatetime(UTC)
            return 0 if ended else phase.number
    return 0


def phase_end(experiment: epb.Experiment, number: int) -> datetime | None:
    """When phase `number` ended (the next phase started, or the experiment stopped); None while it runs."""
    phase = next((p for p in experiment.phases if p.number == number), None)
    if phase is not None and phase.HasField("ended_at"):
        return phase.ended_at.ToDatetime(UTC)
    last = max((p.number for p in experiment.phases), default=0)
    if number == last and experiment.HasField("stopped_at"):
        return experiment.stopped_at.ToDatetime(UTC)
    return None


@dataclass
class _Tally:
    """What a batch did, row by row."""

    accepted: int = 0
    duplicates: int = 0
    rejections: list[apb.RowRejection] = field(default_factory=list)

    def refuse(self, index: int, row_id: str, reason: R.ValueType, detail: str) -> None:
        self.rejections.append(apb.RowRejection(index=index, id=row_id, reason=reason, detail=detail))


class Ingest:
    """Checks and records exposures and outcomes; `experiments` is the catalog's lookup by key."""

    def __init__(
        self,
        experiments: ExperimentLookup,
        store: StatsWriter,
        clock: Clock = _now,
        allocations: AllocationLookup | None = None,
    ) -> None:
        self.experiments = experiments
        self.store = store
        self.clock = clock
        # The catalog's allocations of a phase: an exposure under any other would break the sample-ratio check.
        self.allocations = allocations
        self._plans: dict[tuple[str, int], StatsPlan] = {}

    async def log_exposures(self, rows: Sequence[apb.Exposure]) -> spb.LogExposuresResponse:
        """Record exposures; returns once the accepted ones are durably recorded."""
        now = self.clock()
        tally = _Tally()
        found = await self._lookup({row.experiment_key for row in rows if row.experiment_key})
        groups = _grouped(rows, lambda row: self._exposure(row, found, now), lambda row: row.exposure_id, tally)
        await self._check_allocations(groups, tally, rows)
        for key, items in groups.items():
            if not items:
                continue
            experiment = found[key]
            assert experiment is not None
            verdicts = await self.store.record_exposures(self._plan(experiment), [r for _, r in items], now)
            for (index, recorded), verdict in zip(items, verdicts, strict=True):
                self._count(tally, index, rows[index].exposure_id, verdict, recorded)
        tally.rejections.sort(key=lambda r: r.index)
        return spb.LogExposuresResponse(
            accepted=tally.accepted, duplicates=tally.duplicates, rejections=tally.rejections
        )

    async def log_outcomes(self, batch: spb.LogOutcomesRequest) -> spb.LogOutcomesResponse:
        """Record one outcome batch; returns its acknowledgement once the accepted rows are durably recorded."""
        now = self.clock()
        tally = _Tally()
        rows = batch.outcomes
        found = await self._lookup({row.experiment_key for row in rows if row.experiment_key})
        groups = _grouped(rows, lambda row: self._outcome(row, found, now), lambda row: row.outcome_id, tally)
        for key, items in groups.items():
            experiment = found[key]
            assert experiment is not None
            verdicts = await self.store.record_outcomes(self._plan(experiment), [r for _, r in items], now)
            for (index, outcome), verdict in zip(items, verdicts, strict=True):
                self._count(tally, index, rows[index].outcome_id, verdict, outcome)
        tally.rejections.sort(key=lambda r: r.index)
        return spb.LogOutcomesResponse(
            batch_id=batch.batch_id,
            accepted=tally.accepted,
            duplicates=tally.duplicates,
            rejections=tally.rejections,
        )

    async def _check_allocations(
        self, groups: dict[str, list[tuple[int, ExposureRow]]], tally: _Tally, rows: Sequence[apb.Exposure]
    ) -> None:
        if self.allocations is None:
            return
        known: dict[tuple[str, int], set[int]] = {}
        for key, items in groups.items():
            kept = []
            for index, row in items:
                if (key, row.phase) not in known:
                    known[(key, row.phase)] = set(await self.allocations(key, row.phase)) or {0}
                allowed = known[(key, row.phase)]
                if row.allocation in allowed:
                    kept.append((index, row))
                    continue
                detail = (
                    f"allocation: phase {row.phase} of {key!r} has allocations {sorted(allowed)}, not {row.allocation}"
                )
                tally.refuse(index, rows[index].exposure_id, R.REJECTION_REASON_UNKNOWN_PHASE, detail)
            groups[key] = kept

    def _plan(self, experiment: epb.Experiment) -> StatsPlan:
        # Plans are cached by (key, version): an experiment's metrics and phases change only with its version.
        cache_key = (experiment.key, experiment.version)
        plan = self._plans.get(cache_key)
        if plan is None:
            if len(self._plans) >= PLAN_CACHE:
                self._plans.clear()
            plan = self._plans[cache_key] = StatsPlan.of(experiment)
        return plan

    async def _lookup(self, keys: set[str]) -> dict[str, epb.Experiment | None]:
        return {key: await self.experiments(key) for key in sorted(keys) if len(key) <= MAX_TEXT}

    @staticmethod
    def _count(tally: _Tally, index: int, row_id: str, verdict: Verdict, row: ExposureRow | OutcomeRow) -> None:
        if verdict is Verdict.ACCEPTED:
            tally.accepted += 1
        elif verdict is Verdict.DUPLICATE:
            tally.duplicates += 1
        elif verdict is Verdict.CONFLICTING_ARM:
            assert isinstance(row, ExposureRow)
            detail = f"arm_name: the unit was first exposed to another arm than {row.arm!r} in phase {row.phase}"
            tally.refuse(index, row_id, R.REJECTION_REASON_CONFLICTING_ARM, detail)
        else:
            assert isinstance(row, OutcomeRow)
            detail = f"unit_id: the unit has no exposure in phase {row.phase} at or before occurred_at"
            tally.refuse(index, row_id, R.REJECTION_REASON_UNIT_NOT_EXPOSED, detail)

    @staticmethod
    def _experiment(key: str, found: dict[str, epb.Experiment | None]) -> epb.Experiment:
        experiment = found.get(key)
        if experiment is None:
            raise Refused(R.REJECTION_REASON_UNKNOWN_EXPERIMENT, f"experiment_key: no experiment {key!r}")
        return experiment

    def _exposure(
        self, row: apb.Exposure, found: dict[str, epb.Experiment | None], now: datetime
    ) -> tuple[str, ExposureRow]:
        _required(row, ("exposure_id", "experiment_key", "unit_type", "unit_id", "arm_name"))
        experiment = self._experiment(row.experiment_key, found)
        if row.phase <= 0:
            raise Refused(R.REJECTION_REASON_MISSING_FIELD, f"phase: expected a phase number from 1, got {row.phase}")
        if experiment.status in (epb.EXPERIMENT_STATUS_UNSPECIFIED, epb.EXPERIMENT_STATUS_DRAFT):
            raise Refused(R.REJECTION_REASON_NOT_RUNNING, f"experiment_key: {row.experiment_key!r} has not started")
        if row.phase not in {p.number for p in experiment.phases}:
            detail = f"phase: {row.experiment_key!r} has no phase {row.phase}"
            raise Refused(R.REJECTION_REASON_UNKNOWN_PHASE, detail)
        if row.arm_name not in {a.name for a in experiment.arms}:
            detail = f"arm_name: {row.experiment_key!r} has no arm {row.arm_name!r}"
            raise Refused(R.REJECTION_REASON_UNKNOWN_ARM, detail)
        expected = exposure_id(row.experiment_key, row.phase, row.unit_type, row.unit_id, row.arm_name)
        if row.exposure_id != expected:
            detail = f"exposure_id: expected {expected}, the id of the row's key, phase, unit and arm"
            raise Refused(R.REJECTION_REASON_BAD_EXPOSURE_ID, detail)
        at = row.exposed_at.ToDatetime(UTC) if row.HasField("exposed_at") else now
        ended = phase_end(experiment, row.phase)
        if ended is not None and at >= ended:
            # Its outcomes would count in no phase it was exposed in (see phase_at): as a unit it could only dilute.
            detail = f"exposed_at: phase {row.phase} of {row.experiment_key!r} ended at {ended.isoformat()}"
            detail += f", before {at.isoformat()}"
            raise Refused(R.REJECTION_REASON_NOT_RUNNING, detail)
        unit = unit_key(row.unit_type, row.unit_id)
        return row.experiment_key, ExposureRow(row.phase, unit, row.arm_name, row.allocation, to_us(at))

    def _outcome(
        self, row: apb.Outcome, found: dict[str, epb.Experiment | None], now: datetime
    ) -> tuple[str, OutcomeRow]:
        _required(row, ("outcome_id", "experiment_key", "unit_type", "unit_id", "event"))
        experiment = self._experiment(row.experiment_key, found)
        if row.kind not in apb.OutcomeKind.values():
            detail = f"kind: expected OUTCOME_KIND_OUTCOME or OUTCOME_KIND_COVARIATE, got {row.kind}"
            raise Refused(R.REJECTION_REASON_INVALID_VALUE, detail)
        if row.count < 0:
            raise Refused(R.REJECTION_REASON_NEGATIVE_COUNT, f"count: expected 0 (one) or more, got {row.count}")
        amount = row.value * (row.count or 1)
        if not math.isfinite(amount) or abs(amount) > MAX_AMOUNT:
            expected = f"a finite number of magnitude at most {MAX_AMOUNT:g} (times count)"
            detail = f"value: expected {expected}, got {row.value!r} x {row.count or 1}"
            raise Refused(R.REJECTION_REASON_INVALID_VALUE, detail)
        at = row.occurred_at.ToDatetime(UTC) if row.HasField("occurred_at") else now
        plan = self._plan(experiment)
        unit = unit_key(row.unit_type, row.unit_id)
        if row.kind == apb.OUTCOME_KIND_COVARIATE:
            if experiment.status in (epb.EXPERIMENT_STATUS_UNSPECIFIED, epb.EXPERIMENT_STATUS_DRAFT):
                detail = f"experiment_key: {row.experiment_key!r} has not started"
                raise Refused(R.REJECTION_REASON_NOT_RUNNING, detail)
            if not plan.covariate_targets(row.event):
                detail = f"event: no metric of {row.experiment_key!r} has {row.event!r} as its CUPED covariate"
                raise Refused(R.REJECTION_REASON_UNKNOWN_EVENT, detail)
            return row.experiment_key, OutcomeRow(row.outcome_id, unit, row.event, amount, to_us(at), covariate=True)
        phase = phase_at(experiment, at)
        if phase == 0:
            detail = f"occurred_at: {row.experiment_key!r} was not running at {at.isoformat()}"
            raise Refused(R.REJECTION_REASON_NOT_RUNNING, detail)
        if not plan.outcome_targets(row.event):
            events = sorted({m.event for m in plan.metrics} | {m.denominator_event for m in plan.metrics} - {""})
            detail = f"event: no metric of {row.experiment_key!r} uses {row.event!r}; expected one of {events}"
            raise Refused(R.REJECTION_REASON_UNKNOWN_EVENT, detail)
        return row.experiment_key, OutcomeRow(row.outcome_id, unit, row.event, amount, to_us(at), phase)


def _grouped(
    rows: Sequence[Row], check: Callable[[Row], tuple[str, Checked]], id_of: Callable[[Row], str], tally: _Tally
) -> dict[str, list[tuple[int, Checked]]]:
    """The rows that pass `check`, with their index, by experiment key; each refused row is tallied with its reason."""
    groups: dict[str, list[tuple[int, Checked]]] = {}
    for index, row in enumerate(rows):
        try:
            key, checked = check(row)
        except Refused as refused:
            tally.refuse(index, id_of(row), refused.reason, refused.detail)
            continue
        groups.setdefault(key, []).append((index, checked))
    return groups
