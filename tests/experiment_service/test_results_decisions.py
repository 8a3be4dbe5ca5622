"""Results and decisions over the real catalog (SQLite) and statistics store: the engine sees exactly what was
recorded, the history follows the snapshots, and a decision is refused, overridden or taken as the rules say."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from chassis.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from experiment_service.catalog import ExperimentCatalog
from experiment_service.decisions import Decisions
from experiment_service.ingest import Ingest
from experiment_service.promoter import Shipment
from experiment_service.results import Results
from experiment_service.stats_sqlite import SqliteStats
from experiment_service.stats_store import to_us
from experiment_service.store import ExperimentStore
from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_pb2 as epb
from fresco.api.experiments.v1 import experiment_service_pb2 as spb
from fresco.experiments.exposure import exposure_id
from model_manager.tables import sqlite_url
from tests.experiment_service.stats_support import T0


@dataclass
class Clock:
    """The one clock of the catalog, the ingest and the results, moved by the test."""

    now: datetime

    def __call__(self) -> datetime:
        return self.now

    def us(self) -> int:
        return to_us(self.now)


@dataclass
class World:
    clock: Clock
    catalog: ExperimentCatalog
    stats: SqliteStats
    ingest: Ingest
    results: Results
    decisions: Decisions


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    clock = Clock(T0)
    store = ExperimentStore.open(sqlite_url(tmp_path / "experiments.db"))
    catalog = ExperimentCatalog(store, clock=clock.us)
    await catalog.load()
    stats = await SqliteStats.open(tmp_path / "stats.db", snapshot_every_s=60.0)
    results = Results(catalog, stats, clock=clock)
    ingest = Ingest(catalog.get, stats, clock=clock, allocations=catalog.allocations)
    yield World(clock, catalog, stats, ingest, results, Decisions(catalog, results, None))
    await stats.close()
    store.close()


def ab_test(key: str = "checkout", *, versions: tuple[int, int] = (1, 2)) -> epb.Experiment:
    """A 50/50 test of one conversion metric, 50 units per arm at least."""
    e = epb.Experiment(
        key=key, hypothesis="v2 converts better", model_name="ranker", unit_type="user_id", coverage=1.0,
        min_units_per_arm=50,
    )  # fmt: skip
    e.arms.add(name="control", weight=0.5, model_version=versions[0])
    e.arms.add(name="treatment", weight=0.5, model_version=versions[1])
    e.metrics.add(
        name="converted", kind=epb.METRIC_KIND_PROPORTION, event="purchase", role=epb.METRIC_ROLE_SUCCESS,
        minimum_detectable_effect=0.02,
    )  # fmt: skip
    return e


async def started(world: World, e: epb.Experiment) -> epb.Experiment:
    created = await world.catalog.create(e, "tester")
    return await world.catalog.start(created.key, created.version, "tester")


async def feed(world: World, e: epb.Experiment, rates: Sequence[float], units: int, seed: int = 1) -> None:
    """`units` units per arm exposed now, each converting with its arm's rate an hour later (seeded)."""
    rng = random.Random(seed)
    exposures, outcomes = [], []
    for arm, rate in zip(e.arms, rates, strict=True):
        for u in range(units):
            uid = f"{arm.name}-{u}"
            row = apb.Exposure(
                exposure_id=exposure_id(e.key, 1, "user_id", uid, arm.name), experiment_key=e.key, phase=1,
                unit_type="user_id", unit_id=uid, arm_name=arm.name,
            )  # fmt: skip
            row.exposed_at.FromDatetime(world.clock.now)
            exposures.append(row)
            if rng.random() < rate:
                o = apb.Outcome(
                    outcome_id=f"o-{uid}", experiment_key=e.key, unit_type="user_id", unit_id=uid, event="purchase",
                    value=1.0,
                )  # fmt: skip
                o.occurred_at.FromDatetime(world.clock.now + timedelta(minutes=1))
                outcomes.append(o)
    logged = await world.ingest.log_exposures(exposures)
    assert logged.accepted + logged.duplicates == len(exposures)
    world.clock.now += timedelta(minutes=2)
    acked = await world.ingest.log_outcomes(spb.LogOutcomesRequest(batch_id="b", outcomes=outcomes))
    assert acked.accepted + acked.duplicates == len(outcomes)


async def test_results_see_what_was_recorded_per_arm(world: World) -> None:
    e = await started(world, ab_test())
    await feed(world, e, (0.2, 0.5), 40)
    results = await world.results.results("checkout")
    assert results.phase == 1
    assert [(a.arm_name, a.units) for a in results.arms] == [("control", 40), ("treatment", 40)]
    summaries = {s.arm_name: s for s in results.metrics[0].arms}
    converted = await world.stats.arm_stats("checkout", 1)
    for arm in ("control", "treatment"):
        assert summaries[arm].units == 40
        assert summaries[arm].sum == converted[arm]["converted"].sx
    assert [c.observed_units for c in results.sample_ratio.arms] == [40, 40]
    assert not results.sample_ratio.mismatch
    assert results.running_for_seconds == 120.0
    stray = apb.Exposure(
        exposure_id=exposure_id("checkout", 1, "user_id", "late", "control"), experiment_key="checkout", phase=1,
        unit_type="user_id", unit_id="late", arm_name="control", allocation=7,
    )  # fmt: skip
    refused = await world.ingest.log_exposures([stray])  # an allocation the catalog never made
    assert [(r.reason, r.detail) for r in refused.rejections] == [
        (apb.REJECTION_REASON_UNKNOWN_PHASE, "allocation: phase 1 of 'checkout' has allocations [0], not 7")
    ]
    assert (await world.results.results("checkout")).arms[0].units == 40
    with pytest.raises(NotFound, match="key: no experiment 'nope'"):
        await world.results.results("nope")
    with pytest.raises(NotFound, match="phase: experiment 'checkout' has no phase 4"):
        await world.results.results("checkout", 4)


async def test_history_follows_the_snapshots(world: World) -> None:
    e = await started(world, ab_test())
    await feed(world, e, (0.2, 0.6), 30, seed=2)
    await world.results.results("checkout")  # a snapshot now
    world.clock.now += timedelta(minutes=5)
    more = ab_test()
    await feed(world, more, (0.2, 0.6), 60, seed=3)  # the same units again plus new ones
    world.clock.now += timedelta(seconds=1)
    final = (await world.results.results("checkout")).metrics[0].comparisons[0]  # snapshots what it analyses
    history = await world.results.history("checkout")
    assert [p.arm_name for p in history.points] == ["treatment"] * len(history.points)
    assert len(history.points) >= 2
    assert [p.units for p in history.points][-1] == 120
    assert all(p.sequential_interval.lower <= p.relative_lift <= p.sequential_interval.upper for p in history.points)
    last = history.points[-1]
    assert last.relative_lift == pytest.approx(final.relative_lift)
    assert last.sequential_interval.lower == pytest.approx(final.sequential_interval.lower)
    assert last.sequential_interval.upper == pytest.approx(final.sequential_interval.upper)
    times = [p.at.ToDatetime() for p in history.points]
    assert times == sorted(times)
    with pytest.raises(InvalidArgument, match="metric: experiment 'checkout' has no metric 'x'"):
        await world.results.history("checkout", metric="x")


async def test_decisions_follow_the_recommendation_or_an_override_with_a_reason(world: World) -> None:
    e = await started(world, ab_test())
    await feed(world, e, (0.3, 0.3), 10)
    with pytest.raises(InvalidArgument, match="action: CONTINUE is not a decision"):
        await world.decisions.decide("checkout", e.version, epb.DECISION_ACTION_CONTINUE, "", "", "lead")
    with pytest.raises(Aborted, match="expected_version"):
        await world.decisions.decide("checkout", e.version - 1, epb.DECISION_ACTION_KEEP_CONTROL, "", "x", "lead")
    with pytest.raises(FailedPrecondition, match="action: the results recommend CONTINUE"):
        await world.decisions.decide("checkout", e.version, 0, "", "", "lead")
    with pytest.raises(InvalidArgument, match="reason: KEEP_CONTROL overrides the recommendation CONTINUE"):
        await world.decisions.decide("checkout", e.version, epb.DECISION_ACTION_KEEP_CONTROL, "", " ", "lead")
    # Shipping a model version needs the model manager: refused, and the experiment stays undecided.
    with pytest.raises(FailedPrecondition, match="no --model-manager-address"):
        await world.decisions.decide("checkout", e.version, epb.DECISION_ACTION_SHIP_TREATMENT, "", "ship it", "lead")
    assert (await world.catalog.get("checkout")).status == epb.EXPERIMENT_STATUS_RUNNING  # type: ignore[union-attr]

    decided, results = await world.decisions.decide(
        "checkout", e.version, epb.DECISION_ACTION_KEEP_CONTROL, "", "no budget left", "lead"
    )
    assert decided.status == epb.EXPERIMENT_STATUS_DECIDED
    record = decided.decision
    assert (record.action, record.arm, record.reason, record.overridden) == (
        epb.DECISION_ACTION_KEEP_CONTROL, "", "no budget left", True
    )  # fmt: skip
    assert (record.phase, record.decided_by, record.promotion_operation) == (1, "lead", "")
    assert results.decision.action == epb.DECISION_ACTION_CONTINUE
    with pytest.raises(FailedPrecondition, match="status: experiment 'checkout' is DECIDED"):
        await world.decisions.decide("checkout", decided.version, epb.DECISION_ACTION_KEEP_CONTROL, "", "x", "lead")


async def test_a_clear_winner_ships_without_an_override(world: World) -> None:
    e = ab_test("params", versions=(0, 0))  # parameter-only arms: nothing for the model manager to promote
    e.model_name = ""
    e = await started(world, e)
    await feed(world, e, (0.1, 0.6), 200)
    decided, results = await world.decisions.decide("params", e.version, 0, "", "", "lead")
    assert results.decision.action == epb.DECISION_ACTION_SHIP_TREATMENT
    record = decided.decision
    assert (record.action, record.arm, record.overridden) == (epb.DECISION_ACTION_SHIP_TREATMENT, "treatment", False)
    assert record.reason == results.decision.reason
    assert record.promotion_operation == ""


class GatedPromoter:
    """Stands in for the model manager's side of shipping: records each shipment and holds it until released, so
    two decisions can overlap there."""

    def __init__(self) -> None:
        self.shipped: list[tuple[str, int]] = []
        self.release = asyncio.Event()

    async def promote(self, model_name: str, version: int, reason: str) -> Shipment:
        self.shipped.append((model_name, version))
        await self.release.wait()
        return Shipment(f"op-{version}", f"rollout-{version}")


async def test_two_overlapping_decisions_ship_one_arm_and_a_cancelled_caller_still_gets_it_recorded(
    world: World,
) -> None:
    promoter = GatedPromoter()
    decisions = Decisions(world.catalog, world.results, promoter)
    e = ab_test("race", versions=(1, 2))
    e.arms.add(name="other", weight=0.5, model_version=3)
    e = await started(world, e)
    await feed(world, e, (0.1, 0.6, 0.6), 200)
    ship = epb.DECISION_ACTION_SHIP_TREATMENT
    first = asyncio.create_task(decisions.decide("race", e.version, ship, "treatment", "ship treatment", "alice"))
    while not promoter.shipped:  # noqa: ASYNC110 (polls the recorder the first decision writes to)
        await asyncio.sleep(0.01)
    second = asyncio.create_task(decisions.decide("race", e.version, ship, "other", "ship other", "bob"))
    await asyncio.sleep(0.05)
    first.cancel()  # alice's deadline: the shipment already started must still be recorded
    promoter.release.set()
    with pytest.raises(asyncio.CancelledError):
        await first
    with pytest.raises(Aborted, match="expected_version"):
        await second  # it waited for the first, then found the experiment changed (decided)
    assert promoter.shipped == [("ranker", 2)], "one decision at a time: the second never shipped its arm"
    stored = await world.catalog.get("race")
    assert stored is not None
    assert stored.status == epb.EXPERIMENT_STATUS_DECIDED
    assert (stored.decision.arm, stored.decision.rollout_id, stored.decision.decided_by) == (
        "treatment",
        "rollout-2",
        "alice",
    )
