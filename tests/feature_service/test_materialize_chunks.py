"""Materialisation in chunks against the whole-file rule: whatever the chunk size, row groups, order of event
times, ties, nulls and rejected rows, the store ends holding each entity's latest valid row of the file (on equal
event times, the later row in the file), and statistics count every valid row."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.csv as pa_csv  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest

from feature_service.materialize import Materializer, MaterializeSpec
from feature_service.reader import Catalog
from feature_service.records import Record, entity_key
from feature_service.store import TieredStore
from feature_service.tiers.memory import MemoryCache
from feature_service.tiers.sqlite import SQLiteTier
from fresco.features import parse_definitions
from tests.feature_service.test_materialize import DEFINITIONS, T0

ENTITIES = 9


def _rows(seed: int, count: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        rows.append(
            {
                "driver_id": rng.randrange(ENTITIES),
                # A few event times only: many ties, and rows out of order across the file.
                "event_timestamp": int(T0 + 60 * rng.randrange(6)),
                # Negative fares are refused by the view's range: those rows are rejected.
                "fare": None if rng.random() < 0.15 else float(rng.choice([-1, 1, 2, 3]) * (i + 1)),
                "vehicle": rng.choice(["car", "van", None]),
                "rating": rng.choice([1, 2, None]),
                "premium": rng.choice([True, False, None]),
                "path": rng.choice([[1.0], None, []]),
            }
        )
    return rows


def _expected(rows: list[dict[str, Any]]) -> dict[int, tuple[int, float | None]]:
    """Each entity's latest valid row of the whole file: (event time, fare)."""
    latest: dict[int, dict[str, Any]] = {}
    for row in rows:
        if row["fare"] is not None and row["fare"] < 0:
            continue
        held = latest.get(row["driver_id"])
        if held is None or held["event_timestamp"] <= row["event_timestamp"]:
            latest[row["driver_id"]] = row
    return {key: (row["event_timestamp"], row["fare"]) for key, row in latest.items()}


def _write(rows: list[dict[str, Any]], path: Path, row_group: int) -> None:
    table = pa.table(
        {
            "driver_id": pa.array([r["driver_id"] for r in rows], pa.int64()),
            "event_timestamp": pa.array([r["event_timestamp"] for r in rows], pa.int64()).cast(pa.timestamp("s")),
            "fare": pa.array([r["fare"] for r in rows], pa.float64()),
            "vehicle": pa.array([r["vehicle"] for r in rows], pa.string()),
            "rating": pa.array([r["rating"] for r in rows], pa.int64()),
            "premium": pa.array([r["premium"] for r in rows], pa.bool_()),
            "path": pa.array([r["path"] for r in rows], pa.list_(pa.float64())),
        }
    )
    if path.suffix == ".csv":
        # Lists as JSON text, as a CSV holds them; event times as ISO-8601 text: the cell path.
        table = table.set_column(6, "path", pa.array([None if r["path"] is None else str(r["path"]) for r in rows]))
        table = table.set_column(1, "event_timestamp", table.column(1).cast(pa.string()))
        pa_csv.write_csv(table, path)
    else:
        pq.write_table(table, path, row_group_size=row_group)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[Catalog, SQLiteTier, TieredStore]]:
    catalog = Catalog(parse_definitions(DEFINITIONS))
    tier = SQLiteTier(tmp_path / "features.db")
    await tier.connect()
    store = TieredStore(MemoryCache(), None, tier, None)
    yield catalog, tier, store
    await store.close()


@pytest.mark.parametrize(
    ("seed", "chunk_rows", "row_group", "suffix"),
    [(1, 1, 3, ".parquet"), (2, 4, 3, ".parquet"), (3, 7, 5, ".parquet"), (4, 50, 11, ".parquet"), (5, 3, 0, ".csv")],
)
async def test_the_store_holds_each_entitys_latest_valid_row_of_the_whole_file(
    world: tuple[Catalog, SQLiteTier, TieredStore],
    tmp_path: Path,
    seed: int,
    chunk_rows: int,
    row_group: int,
    suffix: str,
) -> None:
    catalog, tier, store = world
    rows = _rows(seed, 60)
    source = tmp_path / f"trips{suffix}"
    _write(rows, source, row_group)
    materializer = Materializer(catalog, store, tier, chunk_rows=chunk_rows, source_dirs=[tmp_path])
    expected = _expected(rows)
    for _ in range(2):  # a second run of the same file changes nothing
        outcome = await materializer.run(MaterializeSpec("trips", str(source)))
        assert outcome.rows_read == len(rows)
        rejected = sum(1 for r in rows if r["fare"] is not None and r["fare"] < 0)
        assert outcome.rejections.count == rejected
        assert outcome.statistics.row_count == len(rows) - rejected
        keys = list(range(ENTITIES))
        records = (await tier.read({"trips": [entity_key([k]) for k in keys]}))["trips"]
        found = {k: (int(r.event_ts), r.features["fare"]) for k, r in zip(keys, records, strict=True) if r is not None}
        assert found == expected
        # The memory tier (what reads see first) agrees with the durable one.
        memory = (await store.read({"trips": [entity_key([k]) for k in expected]})).records["trips"]
        assert all(isinstance(r, Record) for r in memory)
        assert [(int(r.event_ts), r.features["fare"]) for r in memory if isinstance(r, Record)] == list(
            expected.values()
        )


async def test_nanosecond_event_times_are_materialised_to_the_microsecond(
    world: tuple[Catalog, SQLiteTier, TieredStore], tmp_path: Path
) -> None:
    """pandas writes datetime64[ns] columns as Parquet nanosecond timestamps: times with digits below the
    microsecond (what records keep) are read, not refused as an internal error."""
    catalog, tier, store = world
    base_ns = int(T0) * 10**9
    table = pa.table(
        {
            "driver_id": pa.array([1, 2, 1], pa.int64()),
            "event_timestamp": pa.array([base_ns + 123_456_789, base_ns + 5, base_ns + 999], pa.timestamp("ns")),
            "fare": [1.0, 2.0, 3.0],
            "vehicle": ["car", "van", "car"],
            "rating": pa.array([1, 2, 3], pa.int64()),
            "premium": [True, False, True],
            "path": pa.array([[1.0], [], None], pa.list_(pa.float64())),
        }
    )
    source = tmp_path / "nanos.parquet"
    pq.write_table(table, source)
    materializer = Materializer(catalog, store, tier, chunk_rows=2, source_dirs=[tmp_path])
    outcome = await materializer.run(MaterializeSpec("trips", str(source)))
    assert (outcome.rows_read, outcome.rejections.count) == (3, 0)
    one, two = (await tier.read({"trips": [entity_key([1]), entity_key([2])]}))["trips"]
    assert one is not None
    assert two is not None
    assert (one.features["fare"], one.event_us, two.event_us) == (
        1.0,
        Record({}, T0 + 0.123456, 0.0).event_us,
        Record({}, T0, 0.0).event_us,
    )


@pytest.mark.integration
async def test_chunks_written_a_few_at_a_time_to_redis_and_cassandra_leave_each_entitys_latest_row(
    make_store: Any, view: str, tmp_path: Path
) -> None:
    """Chunk writes overlap (writes_in_flight): Cassandra, Redis and memory still end holding the whole file's
    latest valid row per entity, whatever order the writes land in."""
    catalog = Catalog(parse_definitions(DEFINITIONS.replace("name: trips", f"name: {view}")))
    store = await make_store([view])
    assert store.durable is not None
    rows = _rows(11, 90)
    source = tmp_path / "trips.parquet"
    _write(rows, source, 4)
    materializer = Materializer(catalog, store, store.durable, chunk_rows=3, writes_in_flight=3, source_dirs=[tmp_path])
    outcome = await materializer.run(MaterializeSpec(view, str(source)))
    assert outcome.rows_read == len(rows)
    expected = _expected(rows)
    keys = [entity_key([k]) for k in expected]
    durable = (await store.durable.read({view: keys}))[view]
    assert [(int(r.event_ts), r.features["fare"]) if r else None for r in durable] == list(expected.values())
    for _ in range(2):  # as first read (Redis or Cassandra), then from what that read cached
        read = (await store.read({view: keys})).records[view]
        assert [(int(r.event_ts), r.features["fare"]) for r in read if isinstance(r, Record)] == list(expected.values())
    store.memory.clear()
    read = (await store.read({view: keys})).records[view]
    assert [(int(r.event_ts), r.features["fare"]) for r in read if isinstance(r, Record)] == list(expected.values())
