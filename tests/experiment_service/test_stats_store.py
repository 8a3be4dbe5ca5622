"""The statistics stores, SQLite and Redis, held to one suite: exposures counted once per unit and phase, outcomes
once per id and only after the unit's first exposure, metric values by kind with caps, CUPED covariates in their
window whichever arrives first, and sums that neither retries, reordering nor two writers can change."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from experiment_service.stats_redis import RedisStats
from experiment_service.stats_sqlite import SqliteStats
from experiment_service.stats_store import ExposureRow, OutcomeRow, StatsStore, Verdict
from experiment_service.sufficient import SufficientStats
from fresco.servers import RedisServer
from fresco.servers.pytest_plugin import redis_server
from tests.experiment_service.stats_support import (
    T0,
    Reference,
    covariate,
    exposure,
    outcome,
    plan,
)

__all__ = ["redis_server"]

A, D, C, R = Verdict.ACCEPTED, Verdict.DUPLICATE, Verdict.CONFLICTING_ARM, Verdict.UNIT_NOT_EXPOSED
Opener = Callable[[], Awaitable[StatsStore]]


@pytest.fixture(params=["sqlite", "redis"])
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens stores of one backend that share their data (one SQLite file, or one Redis key prefix)."""
    stores: list[StatsStore] = []
    prefix = f"test:{uuid.uuid4().hex[:10]}:"

    async def open_one() -> StatsStore:
        store: StatsStore
        if request.param == "sqlite":
            store = await SqliteStats.open(tmp_path / "stats.db", snapshot_every_s=60.0)
        else:
            server: RedisServer = request.getfixturevalue("redis_server")
            store = RedisStats.from_url(server.url, prefix=prefix, snapshot_every_s=60.0)
        stores.append(store)
        return store

    yield open_one
    for store in stores:
        await store.close()


def stats(n: int, xs: list[float], ys: list[float] | None = None, n_y: int = 0) -> SufficientStats:
    """Sums of n units whose non-zero values are xs (and ys)."""
    ys = ys or []
    pairs = list(zip(xs, ys, strict=False))
    return SufficientStats(
        n,
        sum(xs),
        sum(x * x for x in xs),
        sum(ys),
        sum(y * y for y in ys),
        sum(x * y for x, y in pairs),
        n_y,
    )


async def test_exposures_count_each_unit_once_per_phase_and_refuse_a_second_arm(open_store: Opener) -> None:
    store = await open_store()
    p = plan(phases=2)
    rows = [
        exposure("u1", "control"),
        exposure("u2", "treatment", allocation=3),
        exposure("u1", "control", at_h=2),  # another replica's sighting: a duplicate
        exposure("u1", "treatment"),  # the same unit in another arm of the same phase
        exposure("u1", "treatment", phase=2),  # a new phase is a new start
    ]
    verdicts = await store.record_exposures(p, rows, T0)
    assert verdicts == [A, A, D, C, A]
    assert await store.record_exposures(p, rows, T0) == [D, D, D, C, D]

    arms = await store.arm_stats("checkout", 1)
    assert set(arms) == {"control", "treatment"}
    for arm in arms.values():
        assert set(arm) == {"converted", "revenue", "ctr", "spend"}
        assert all(s == SufficientStats(n=1) for s in arm.values())
    assert (await store.arm_stats("checkout", 2))["treatment"]["converted"] == SufficientStats(n=1)
    assert await store.units_by_allocation("checkout", 1) == {"control": {0: 1}, "treatment": {3: 1}}
    assert await store.arm_stats("other", 1) == {}


async def test_outcomes_make_metric_values_by_kind_with_caps(open_store: Opener) -> None:
    store = await open_store()
    p = plan()
    await store.record_exposures(p, [exposure("u1", "control"), exposure("u2", "control")], T0)
    rows = [
        outcome("o1", "u1", "purchase", 60.0),
        outcome("o2", "u1", "purchase", 70.0),  # revenue 130 capped at 100; converted stays 1
        outcome("o3", "u2", "purchase", 0.0),  # no positive value: not converted
        outcome("o4", "u2", "click", 2.0),
        outcome("o5", "u2", "view", 5.0),
        outcome("o6", "u1", "view", 4.0),
    ]
    assert await store.record_outcomes(p, rows, T0) == [A] * 6
    arm = (await store.arm_stats("checkout", 1))["control"]
    assert arm["converted"] == stats(2, [1.0])
    assert arm["revenue"] == stats(2, [100.0])
    # ctr: u1 (x 0, y 4), u2 (x 2, y 5): both units have a denominator
    assert arm["ctr"] == SufficientStats(2, 2.0, 4.0, 9.0, 41.0, 10.0, 2)
    assert arm["spend"] == SufficientStats(n=2)


async def test_outcomes_count_only_after_the_first_exposure_and_once_per_id(open_store: Opener) -> None:
    store = await open_store()
    p = plan()
    early = outcome("o1", "u1", "spend", 5.0, at_h=1.0)
    assert await store.record_outcomes(p, [early], T0) == [R]  # not exposed yet: the client keeps the row
    await store.record_exposures(p, [exposure("u1", "treatment", at_h=2.0)], T0)
    assert await store.record_outcomes(p, [early], T0) == [R]  # it happened before the exposure
    late = outcome("o2", "u1", "spend", 7.0, at_h=3.0)
    assert await store.record_outcomes(p, [late, late], T0) == [A, D]
    assert await store.record_outcomes(p, [late], T0) == [D]
    # An earlier sighting of the same exposure (another replica) makes the first row count when resent.
    await store.record_exposures(p, [exposure("u1", "treatment", at_h=0.5)], T0)
    assert await store.record_outcomes(p, [early], T0) == [A]
    assert (await store.arm_stats("checkout", 1))["treatment"]["spend"] == stats(1, [12.0])


async def test_cuped_covariates_join_their_window_whether_they_arrive_before_or_after(open_store: Opener) -> None:
    store = await open_store()
    p = plan()  # spend: CUPED over the 24 h before the first exposure
    before = [
        covariate("c1", "u1", "spend", 3.0, at_h=-2.0),
        covariate("c2", "u1", "spend", 4.0, at_h=-30.0),  # outside the window
        covariate("c3", "u1", "purchase", 9.0, at_h=-1.0),  # no metric's covariate: stored, not counted
    ]
    assert await store.record_outcomes(p, before, T0) == [A, A, A]
    await store.record_exposures(p, [exposure("u1", "control"), exposure("u2", "control")], T0)
    after = [
        covariate("c4", "u2", "spend", 6.0, at_h=-5.0),  # after u2's exposure arrived, dated before it
        covariate("c5", "u2", "spend", 1.0, at_h=0.5),  # after the exposure: not pre-exposure data
        covariate("c1", "u1", "spend", 3.0, at_h=-2.0),  # a retry
    ]
    assert await store.record_outcomes(p, after, T0) == [A, A, D]
    await store.record_exposures(p, [exposure("u3", "control")], T0)  # no prior data: y 0, not in n_y
    await store.record_outcomes(p, [outcome("o1", "u1", "spend", 10.0), outcome("o2", "u2", "spend", 2.0)], T0)
    spend = (await store.arm_stats("checkout", 1))["control"]["spend"]
    # units (x, y): u1 (10, 3), u2 (2, 6), u3 (0, 0)
    assert spend == SufficientStats(3, 12.0, 104.0, 9.0, 45.0, 42.0, 2)
    # u1 seen exposed 10 h earlier by another replica: its window [-34 h, -10 h) now holds c2 and no longer c1.
    await store.record_exposures(p, [exposure("u1", "control", at_h=-10.0)], T0)
    spend = (await store.arm_stats("checkout", 1))["control"]["spend"]
    assert spend == SufficientStats(3, 12.0, 104.0, 10.0, 52.0, 52.0, 2)


async def test_retries_reordering_and_two_writers_leave_exact_sums(open_store: Opener) -> None:
    first, second = await open_store(), await open_store()
    p = plan()
    rng = random.Random(20260105)
    arms = ("control", "treatment")
    rows: list[ExposureRow | OutcomeRow] = []
    for u in range(40):
        uid = f"u{u}"
        rows.append(exposure(uid, arms[u % 2], at_h=rng.randint(0, 3)))
        for k in range(rng.randint(0, 4)):
            event = rng.choice(["purchase", "click", "view", "spend"])
            rows.append(outcome(f"o{u}.{k}", uid, event, float(rng.randint(0, 150)), at_h=rng.randint(4, 9)))
        rows.append(covariate(f"c{u}", uid, "spend", float(rng.randint(1, 9)), at_h=rng.randint(-30, -1)))
    reference = Reference(p)
    reference.add(rows)

    async def deliver(store: StatsStore, order: list[ExposureRow | OutcomeRow]) -> None:
        pending = list(order)
        while pending:  # batches of mixed rows; outcomes refused before their exposure are sent again later
            batch, pending = pending[:7], pending[7:]
            exposures = [r for r in batch if isinstance(r, ExposureRow)]
            outcomes = [r for r in batch if isinstance(r, OutcomeRow)]
            await store.record_exposures(p, exposures, T0)
            verdicts = await store.record_outcomes(p, outcomes, T0)
            await store.record_outcomes(p, outcomes, T0)  # the same batch again: all duplicates now
            pending += [r for r, v in zip(outcomes, verdicts, strict=True) if v is Verdict.UNIT_NOT_EXPOSED]
            await asyncio.sleep(0)

    one, two = rows[:], rows[:]
    rng.shuffle(one)
    rng.shuffle(two)
    await asyncio.gather(deliver(first, one), deliver(second, two))
    expected = reference.arm_stats()
    assert await first.arm_stats("checkout", 1) == expected
    assert await second.arm_stats("checkout", 1) == expected
    assert sum(s["converted"].n for s in expected.values()) == 40


async def test_snapshots_are_spaced_while_outcomes_arrive_and_taken_on_demand(open_store: Opener) -> None:
    from datetime import timedelta

    store = await open_store()
    p = plan()
    await store.record_exposures(p, [exposure("u1", "control")], T0)  # the first change snapshots at once
    await store.record_outcomes(p, [outcome("o1", "u1", "spend", 1.0)], T0 + timedelta(seconds=30))
    await store.record_outcomes(p, [outcome("o2", "u1", "spend", 2.0)], T0 + timedelta(seconds=61))
    history = await store.snapshots("checkout", 1)
    assert [s.at for s in history] == [T0, T0 + timedelta(seconds=61)]
    assert history[0].arms["control"]["spend"] == SufficientStats(n=1)
    assert history[1].arms["control"]["spend"] == stats(1, [3.0])
    assert await store.snapshot("checkout", 1, T0 + timedelta(seconds=62)) is False  # nothing changed
    await store.record_outcomes(p, [outcome("o3", "u1", "spend", 4.0)], T0 + timedelta(seconds=63))
    assert await store.snapshot("checkout", 1, T0 + timedelta(seconds=64)) is True
    history = await store.snapshots("checkout", 1)
    assert history[-1].arms["control"]["spend"] == stats(1, [7.0])
    assert len(history) == 3


async def test_fractional_values_keep_full_precision(open_store: Opener) -> None:
    store = await open_store()
    p = plan()
    rng = random.Random(7)
    rows: list[ExposureRow | OutcomeRow] = [exposure(f"u{u}", "treatment") for u in range(10)]
    rows += [outcome(f"o{i}", f"u{i % 10}", "spend", rng.uniform(-5.0, 5.0) / 3.0) for i in range(60)]
    reference = Reference(p)
    reference.add(rows)
    await store.record_exposures(p, [r for r in rows if isinstance(r, ExposureRow)], T0)
    await store.record_outcomes(p, [r for r in rows if isinstance(r, OutcomeRow)], T0)
    got = (await store.arm_stats("checkout", 1))["treatment"]["spend"]
    want = reference.arm_stats()["treatment"]["spend"]
    assert got.n == want.n
    for name in ("sx", "sxx"):
        assert getattr(got, name) == pytest.approx(getattr(want, name), rel=1e-12, abs=1e-12)
