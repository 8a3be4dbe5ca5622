"""Exposure and outcome batches checked against their experiments: every refused row gets its reason and a detail
naming the field, the other rows of the batch are recorded, and fuzzed rows never raise."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from experiment_service.ingest import Ingest, phase_at
from experiment_service.stats_sqlite import SqliteStats
from experiment_service.sufficient import SufficientStats
from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_pb2 as epb
from fresco.api.experiments.v1 import experiment_service_pb2 as spb
from tests.experiment_service.stats_support import T0, experiment, exposure_proto_id

R = apb.RejectionReason
NOW = T0 + timedelta(days=3)


World = tuple[Ingest, SqliteStats, dict[str, epb.Experiment]]


async def open_world(path: Path) -> World:
    """An Ingest over a SQLite store and three experiments: running (two phases), draft, and stopped."""
    store = await SqliteStats.open(path)
    stopped = experiment("stopped")
    stopped.status = epb.EXPERIMENT_STATUS_STOPPED
    stopped.stopped_at.FromDatetime(T0 + timedelta(hours=5))
    experiments = {
        "checkout": experiment("checkout", phases=2),
        "draft": experiment("draft", status=epb.EXPERIMENT_STATUS_DRAFT),
        "stopped": stopped,
    }

    async def lookup(key: str) -> epb.Experiment | None:
        return experiments.get(key)

    return Ingest(lookup, store, clock=lambda: NOW), store, experiments


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    """open_world on a fresh file, closed after the test."""
    opened = await open_world(tmp_path / "stats.db")
    yield opened
    await opened[1].close()


def exposure(uid: str, arm: str = "control", phase: int = 1, key: str = "checkout", at_h: float = 0.0) -> apb.Exposure:
    row = apb.Exposure(
        exposure_id=exposure_proto_id(key, phase, uid, arm),
        experiment_key=key,
        phase=phase,
        unit_type="user_id",
        unit_id=uid,
        arm_name=arm,
    )
    row.exposed_at.FromDatetime(T0 + timedelta(hours=at_h))
    return row


def outcome(
    oid: str, uid: str, event: str = "purchase", value: float = 1.0, at_h: float = 1.0, **fields: object
) -> apb.Outcome:
    row = apb.Outcome(outcome_id=oid, experiment_key="checkout", unit_type="user_id", unit_id=uid, event=event)
    row.value = value
    row.occurred_at.FromDatetime(T0 + timedelta(hours=at_h))
    for name, value_ in fields.items():
        setattr(row, name, value_)
    return row


def reasons(response: spb.LogExposuresResponse | spb.LogOutcomesResponse) -> dict[int, R.ValueType]:
    return {r.index: r.reason for r in response.rejections}


async def test_exposures_are_refused_with_their_reason_and_the_rest_recorded(world: World) -> None:
    ingest, store, _ = world
    bad_id = exposure("u9")
    bad_id.exposure_id = "0" * 32
    rows = [
        exposure("u1"),
        exposure("u1"),
        exposure("u1", arm="treatment"),
        exposure("u2", key="nope"),
        exposure("u3", key="draft"),
        exposure("u4", phase=7),
        exposure("u5", arm="ghost"),
        bad_id,
        apb.Exposure(experiment_key="checkout", phase=1, unit_type="user_id", unit_id="u6", arm_name="control"),
        exposure("u7", arm="treatment", phase=2),
    ]
    response = await ingest.log_exposures(rows)
    assert (response.accepted, response.duplicates) == (2, 1)
    assert reasons(response) == {
        2: R.REJECTION_REASON_CONFLICTING_ARM,
        3: R.REJECTION_REASON_UNKNOWN_EXPERIMENT,
        4: R.REJECTION_REASON_NOT_RUNNING,
        5: R.REJECTION_REASON_UNKNOWN_PHASE,
        6: R.REJECTION_REASON_UNKNOWN_ARM,
        7: R.REJECTION_REASON_BAD_EXPOSURE_ID,
        8: R.REJECTION_REASON_MISSING_FIELD,
    }
    details = {r.index: r.detail for r in response.rejections}
    assert details[3].startswith("experiment_key:")
    assert "'nope'" in details[3]
    assert details[7].startswith("exposure_id: expected " + exposure_proto_id("checkout", 1, "u9", "control"))
    assert details[8].startswith("exposure_id: required")
    assert (await store.arm_stats("checkout", 1))["control"]["revenue"] == SufficientStats(n=1)
    assert (await store.arm_stats("checkout", 2))["treatment"]["revenue"] == SufficientStats(n=1)


async def test_outcomes_are_refused_with_their_reason_and_the_rest_acknowledged(world: World) -> None:
    ingest, store, _ = world
    await ingest.log_exposures([exposure("u1"), exposure("u2", arm="treatment", phase=2, at_h=24.5)])
    unknown = outcome("o4", "u1")
    unknown.experiment_key = "nope"
    stopped = outcome("o9", "u1", at_h=6.0)
    stopped.experiment_key = "stopped"
    rows = [
        outcome("o1", "u1", value=30.0),
        outcome("o2", "u1", value=5.0, count=3),  # 15 more revenue
        outcome("o3", "u1", count=-2),
        unknown,
        outcome("o5", "u1", value=math.nan),
        outcome("o6", "u1", value=math.inf),
        outcome("o7", "u1", event="hover"),
        outcome("o8", "stranger"),
        stopped,
        outcome("", "u1"),
        outcome("o10", "u1", at_h=-1.0),  # before the experiment started
        outcome("o11", "u2", at_h=25.0),  # in phase 2, where u2 is exposed
        outcome("o12", "u1", at_h=25.0),  # in phase 2, where u1 is not
        outcome("o13", "u1", value=1e308, count=10),  # overflows to inf
        outcome("o1", "u1", value=30.0),  # a retry within the batch
        outcome("o14", "u1", kind=9),
        outcome("c1", "u1", event="spend", value=4.0, at_h=-3.0, kind=apb.OUTCOME_KIND_COVARIATE),
        outcome("c2", "u1", event="click", value=4.0, at_h=-3.0, kind=apb.OUTCOME_KIND_COVARIATE),
        outcome("o15", "u1", value=-1e99, count=30),  # finite, but sums of its square could overflow
    ]
    response = await ingest.log_outcomes(spb.LogOutcomesRequest(batch_id="b1", outcomes=rows))
    assert (response.batch_id, response.accepted, response.duplicates) == ("b1", 4, 1)
    assert reasons(response) == {
        2: R.REJECTION_REASON_NEGATIVE_COUNT,
        3: R.REJECTION_REASON_UNKNOWN_EXPERIMENT,
        4: R.REJECTION_REASON_INVALID_VALUE,
        5: R.REJECTION_REASON_INVALID_VALUE,
        6: R.REJECTION_REASON_UNKNOWN_EVENT,
        7: R.REJECTION_REASON_UNIT_NOT_EXPOSED,
        8: R.REJECTION_REASON_NOT_RUNNING,
        9: R.REJECTION_REASON_MISSING_FIELD,
        10: R.REJECTION_REASON_NOT_RUNNING,
        12: R.REJECTION_REASON_UNIT_NOT_EXPOSED,
        13: R.REJECTION_REASON_INVALID_VALUE,
        15: R.REJECTION_REASON_INVALID_VALUE,
        17: R.REJECTION_REASON_UNKNOWN_EVENT,
        18: R.REJECTION_REASON_INVALID_VALUE,
    }
    details = {r.index: r.detail for r in response.rejections}
    assert details[2] == "count: expected 0 (one) or more, got -2"
    assert details[6].startswith("event: no metric of 'checkout' uses 'hover'")
    assert details[9] == "outcome_id: required, got an empty value"
    assert details[15] == "kind: expected OUTCOME_KIND_OUTCOME or OUTCOME_KIND_COVARIATE, got 9"
    assert details[17] == "event: no metric of 'checkout' has 'click' as its CUPED covariate"
    assert details[18] == "value: expected a finite number of magnitude at most 1e+100 (times count), got -1e+99 x 30"
    assert (await store.arm_stats("checkout", 1))["control"]["revenue"] == SufficientStats(1, 45.0, 2025.0)
    assert (await store.arm_stats("checkout", 2))["treatment"]["converted"] == SufficientStats(1, 1.0, 1.0)
    # The covariate, 3 h before u1's exposure, is in its CUPED window: y = 4 for the spend metric.
    assert (await store.arm_stats("checkout", 1))["control"]["spend"] == SufficientStats(1, sy=4.0, syy=16.0, n_y=1)


def test_the_phase_of_an_outcome_is_the_one_in_force_at_its_time() -> None:
    exp = experiment("checkout", phases=2)
    assert phase_at(exp, T0 - timedelta(seconds=1)) == 0
    assert phase_at(exp, T0) == 1
    assert phase_at(exp, T0 + timedelta(hours=23)) == 1
    assert phase_at(exp, T0 + timedelta(days=1)) == 2
    exp.status = epb.EXPERIMENT_STATUS_STOPPED
    exp.stopped_at.FromDatetime(T0 + timedelta(days=2))
    assert phase_at(exp, T0 + timedelta(days=1, hours=1)) == 2  # late outcomes of a stopped experiment count
    assert phase_at(exp, T0 + timedelta(days=2)) == 0
    assert phase_at(experiment("d", status=epb.EXPERIMENT_STATUS_DRAFT), datetime(2027, 1, 1, tzinfo=UTC)) == 0


texts = st.text(max_size=12) | st.sampled_from(["checkout", "u1", "purchase", "spend", "click", "control", ""])
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 1.0, 2.5])
outcomes = st.builds(
    apb.Outcome,
    outcome_id=texts,
    experiment_key=texts,
    unit_type=st.sampled_from(["user_id", ""]) | texts,
    unit_id=texts,
    event=texts,
    value=floats,
    count=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    kind=st.sampled_from([0, 1, 2, 7]),
)
exposures = st.builds(
    apb.Exposure,
    exposure_id=texts,
    experiment_key=texts,
    phase=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    unit_type=texts,
    unit_id=texts,
    arm_name=texts,
    allocation=st.integers(min_value=-(2**31), max_value=2**31 - 1),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(outcomes, max_size=8), shown=st.lists(exposures, max_size=4))
def test_fuzzed_rows_are_answered_never_raised(
    tmp_path: Path, batch: list[apb.Outcome], shown: list[apb.Exposure]
) -> None:
    async def run() -> None:
        ingest, store, _ = await open_world(tmp_path / "fuzz.db")
        try:
            logged = await ingest.log_exposures(shown)
            assert logged.accepted + logged.duplicates + len(logged.rejections) == len(shown)
            response = await ingest.log_outcomes(spb.LogOutcomesRequest(batch_id="f", outcomes=batch))
            assert response.accepted + response.duplicates + len(response.rejections) == len(batch)
            assert all(r.reason != R.REJECTION_REASON_UNSPECIFIED and r.detail for r in response.rejections)
        finally:
            await store.close()

    asyncio.run(run())


async def test_an_exposure_after_its_phase_ended_is_refused(world: World) -> None:
    # A gateway still on the old configuration answers after the phase ended (a weight change, a stop): the unit's
    # outcomes from then on count in no phase it was exposed in, so as a unit of the old phase it could only dilute.
    ingest, store, _ = world
    rows = [
        exposure("late", at_h=30),  # phase 1 of checkout ended at 24 h, when phase 2 started
        exposure("in-time", at_h=23),
        exposure("after-stop", key="stopped", at_h=6),  # stopped at 5 h
        exposure("before-stop", key="stopped", at_h=4),
    ]
    response = await ingest.log_exposures(rows)
    assert response.accepted == 2
    assert reasons(response) == {0: R.REJECTION_REASON_NOT_RUNNING, 2: R.REJECTION_REASON_NOT_RUNNING}
    assert all(r.detail.startswith("exposed_at: phase 1 of ") for r in response.rejections)
    assert (await store.arm_stats("checkout", 1))["control"]["revenue"] == SufficientStats(n=1)
    assert (await store.arm_stats("stopped", 1))["control"]["revenue"] == SufficientStats(n=1)
    late = await ingest.log_outcomes(spb.LogOutcomesRequest(outcomes=[outcome("o-late", "late", at_h=31)]))
    assert reasons(late) == {0: R.REJECTION_REASON_UNIT_NOT_EXPOSED}  # what made its exposure only dilute
