"""Results of one phase of an experiment: the store's sums and the catalog's weights handed to the statistics
engine, and a metric's lift over time from the store's snapshots."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from chassis.errors import FailedPrecondition, InvalidArgument, NotFound
from experiment_service.analysis import ArmData, analyse, compare_point
from experiment_service.stats_store import StatsReader, StatsWriter
from fresco.api.experiments.v1 import experiment_pb2 as epb
from fresco.api.experiments.v1 import experiment_service_pb2 as spb
from fresco.api.experiments.v1 import results_pb2 as rpb

Clock = Callable[[], datetime]


class Catalog(Protocol):
    """The parts of the experiment catalog results read."""

    async def get(self, key: str) -> epb.Experiment | None:
        """The experiment, or None."""
        ...

    async def allocations(self, key: str, phase: int) -> dict[int, tuple[float, ...]]:
        """The weights in force per allocation of the phase."""
        ...


class StatsSource(StatsReader, StatsWriter, Protocol):
    """Results read the store and ask it for a snapshot of what they analyse."""


def _now() -> datetime:
    return datetime.now(UTC)


def pick_phase(experiment: epb.Experiment, phase: int) -> epb.Phase:
    """The phase asked for (0: the current or last one); FAILED_PRECONDITION before any, NOT_FOUND for no such."""
    if not experiment.phases:
        raise FailedPrecondition(f"key: experiment {experiment.key!r} has not started; it has no phase to analyse")
    if phase == 0:
        return max(experiment.phases, key=lambda p: p.number)
    for candidate in experiment.phases:
        if candidate.number == phase:
            return candidate
    numbers = sorted(p.number for p in experiment.phases)
    raise NotFound(f"phase: experiment {experiment.key!r} has no phase {phase}; its phases are {numbers}")


def running_for(experiment: epb.Experiment, phase: epb.Phase, now: datetime) -> float:
    """Seconds the phase ran: from its start to its end, the experiment's stop, or now."""
    start = phase.started_at.ToDatetime(UTC)
    if phase.HasField("ended_at"):
        end = phase.ended_at.ToDatetime(UTC)
    elif experiment.HasField("stopped_at"):
        end = experiment.stopped_at.ToDatetime(UTC)
    else:
        end = now
    return max(0.0, (end - start).total_seconds())


class Results:
    """GetResults and GetResultsHistory over the catalog and the statistics store."""

    def __init__(self, catalog: Catalog, stats: StatsSource, clock: Clock = _now) -> None:
        self.catalog = catalog
        self.stats = stats
        self.clock = clock

    async def _experiment(self, key: str) -> epb.Experiment:
        if not key:
            raise InvalidArgument("key: expected an experiment key")
        found = await self.catalog.get(key)
        if found is None:
            raise NotFound(f"key: no experiment {key!r}")
        return found

    async def results(self, key: str, phase: int = 0) -> rpb.ExperimentResults:
        """The analysis of one phase now (recording a snapshot of its sums for the history)."""
        experiment = await self._experiment(key)
        return await self.analyse(experiment, phase)

    async def analyse(self, experiment: epb.Experiment, phase: int = 0) -> rpb.ExperimentResults:
        """The analysis of one phase of a given experiment."""
        if phase < 0:
            raise InvalidArgument(f"phase: expected a phase number, or 0 for the current one; got {phase}")
        chosen = pick_phase(experiment, phase)
        key, number, now = experiment.key, chosen.number, self.clock()
        await self.stats.snapshot(key, number, now)
        sums = await self.stats.arm_stats(key, number)
        units = await self.stats.units_by_allocation(key, number)
        weights = await self.catalog.allocations(key, number)
        arms = [ArmData(a.name, sums.get(a.name, {}), units.get(a.name, {})) for a in experiment.arms]
        try:
            return analyse(
                experiment,
                number,
                arms,
                running_for(experiment, chosen, now),
                now,
                weights_by_allocation=weights or None,
            )
        except ValueError as err:  # recorded data the configuration no longer describes (e.g. arms renamed)
            raise FailedPrecondition(f"phase: phase {number} of {key!r} cannot be analysed: {err}") from None

    async def history(self, key: str, phase: int = 0, metric: str = "") -> spb.GetResultsHistoryResponse:
        """One metric's lift and confidence sequence per treatment arm at every snapshot of the phase."""
        experiment = await self._experiment(key)
        if phase < 0:
            raise InvalidArgument(f"phase: expected a phase number, or 0 for the current one; got {phase}")
        chosen = pick_phase(experiment, phase)
        names = [m.name for m in experiment.metrics]
        if not names:
            raise FailedPrecondition(f"key: experiment {key!r} has no metrics")
        metric = metric or names[0]
        if metric not in names:
            raise InvalidArgument(f"metric: experiment {key!r} has no metric {metric!r}; its metrics are {names}")
        control = experiment.control_arm or experiment.arms[0].name
        treatments = [a.name for a in experiment.arms if a.name != control]
        response = spb.GetResultsHistoryResponse()
        for snapshot in await self.stats.snapshots(key, chosen.number):
            base = snapshot.arms.get(control, {}).get(metric)
            for arm in treatments:
                other = snapshot.arms.get(arm, {}).get(metric)
                if base is None or other is None or base.n < 2 or other.n < 2 or base.sx == 0:
                    continue  # no relative lift before both arms have units and control has a non-zero mean
                try:
                    lift, lower, upper = compare_point(experiment, metric, base, other)
                except ValueError as err:
                    raise FailedPrecondition(f"metric: {metric!r} of {key!r} cannot be compared: {err}") from None
                if not math.isfinite(lift):
                    continue
                # An interval bound stays infinite while the sample is too small for the confidence sequence.
                point = response.points.add(arm_name=arm, units=base.n + other.n, relative_lift=lift)
                point.at.FromDatetime(snapshot.at)
                point.sequential_interval.lower = lower
                point.sequential_interval.upper = upper
        return response
