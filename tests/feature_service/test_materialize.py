"""Materialisation in process: statistics on a small known data set, the latest valid row per entity,
column mapping, time ranges, CSV parsing problems, chunked writes with progress, and bad sources."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest

from chassis.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unavailable
from feature_service import convert
from feature_service.materialize import MaterializeProgress, Materializer, MaterializeSpec
from feature_service.reader import Catalog
from feature_service.records import Record, entity_key
from feature_service.store import TieredStore
from feature_service.tiers.memory import MemoryCache
from feature_service.tiers.sqlite import SQLiteTier
from feature_service.writer import Violation
from fresco.features import parse_definitions
from fresco.features.statistics import baselines, summarize

DEFINITIONS = """
entities:
  - {name: driver, join_keys: [{name: driver_id, type: int64}]}
feature_views:
  - name: trips
    entities: [driver]
    features:
      - {name: fare, type: double, range: {min: 0}, null_policy: {strategy: mean}}
      - {name: vehicle, type: string, null_policy: {strategy: most_frequent}}
      - {name: rating, type: int64, null_policy: {strategy: median}}
      - {name: premium, type: bool}
      - {name: path, type: double_list}
"""
T0 = datetime(2026, 1, 1, tzinfo=UTC).timestamp()


class CountingTier(SQLiteTier):
    """SQLite that remembers the size of each write batch."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.batches: list[int] = []

    async def write(self, view: str, rows: Sequence[tuple[str, Record]]) -> dict[str, Record]:
        self.batches.append(len(rows))
        return await super().write(view, rows)


@pytest.fixture
def catalog() -> Catalog:
    return Catalog(parse_definitions(DEFINITIONS))


@pytest.fixture
async def tier(tmp_path: Path) -> CountingTier:
    """Closed with the store that owns it."""
    tier = CountingTier(tmp_path / "features.db")
    await tier.connect()
    return tier


@pytest.fixture
async def materializer(catalog: Catalog, tier: CountingTier, tmp_path: Path) -> AsyncIterator[Materializer]:
    store = TieredStore(MemoryCache(), None, tier, None)
    yield Materializer(catalog, store, tier, chunk_rows=2, max_rejections=10, source_dirs=[tmp_path])
    await store.close()


def trips(path: Path) -> Path:
    """Seven rows: driver 1 twice (the later row wins), one out-of-range fare, nulls here and there."""
    table = pa.table(
        {
            "driver_id": pa.array([1, 2, 3, 1, 4, 5, 6], pa.int64()),
            "fare": [10.0, 20.0, None, 30.0, 40.0, -1.0, 20.0],
            "vehicle": ["car", "van", "car", "car", None, "car", "bike"],
            "rating": pa.array([5, 4, None, 3, 4, 1, 4], pa.int64()),
            "premium": [True, False, None, True, False, True, False],
            "path": [[1.0, 2.0], None, [3.0], [], None, None, [0.5]],
            "event_timestamp": pa.array([T0 + i * 60 for i in [0, 1, 2, 3, 4, 5, 6]], pa.float64())
            .cast(pa.int64())
            .cast(pa.timestamp("s")),
        }
    )
    pq.write_table(table, path)
    return path


async def test_statistics_of_a_known_data_set(materializer, catalog, tier, tmp_path: Path) -> None:
    steps: list[MaterializeProgress] = []
    source = trips(tmp_path / "trips.parquet")
    outcome = await materializer.run(MaterializeSpec("trips", str(source)), steps.append)

    # Driver 1's rows fall in two chunks of two: each chunk writes its latest row, the store keeps the later.
    assert (outcome.rows_read, outcome.rows_written, outcome.rejections.count) == (7, 6, 1)
    (rejected,) = outcome.rejections.rows
    assert (rejected.row_index, [(p.feature, p.code) for p in rejected.problems]) == (
        5,
        [("fare", Violation.OUT_OF_RANGE)],
    )

    stats = outcome.statistics
    assert (stats.feature_view, stats.row_count, stats.source_uri) == ("trips", 6, str(source))
    assert (stats.min_event_time.seconds, stats.max_event_time.seconds) == (T0, T0 + 360)
    fare, vehicle, rating, premium, path = stats.features
    valid_fares = [10.0, 20.0, 30.0, 40.0, 20.0]
    assert (fare.count, fare.null_count, fare.null_rate) == (6, 1, pytest.approx(1 / 6))
    assert fare.numeric.mean == pytest.approx(24.0)
    assert fare.numeric.stddev == pytest.approx(float(np.std(valid_fares)))
    assert (fare.numeric.min, fare.numeric.max) == (10.0, 40.0)
    percentiles = {p.quantile: p.value for p in fare.numeric.percentiles}
    assert percentiles[0.5] == 20.0
    assert percentiles[0.25] == pytest.approx(float(np.quantile(valid_fares, 0.25)))
    assert sum(fare.numeric.histogram.bucket_counts) == 5
    assert len(fare.numeric.histogram.bucket_counts) == len(fare.numeric.histogram.bucket_bounds) + 1
    assert fare.numeric.histogram.bucket_bounds[-1] == 40.0
    assert (vehicle.null_count, vehicle.categorical.distinct_count) == (1, 3)
    assert [(c.value, c.count) for c in vehicle.categorical.top_categories] == [("car", 3), ("van", 1), ("bike", 1)]
    assert vehicle.categorical.top_categories[0].fraction == pytest.approx(3 / 5)
    assert (rating.null_count, rating.numeric.mean) == (1, pytest.approx(4.0))
    assert premium.categorical.distinct_count == 2
    # fresco.features.statistics summarises list features as categories (their repr), not element-wise.
    assert (path.null_count, path.categorical.distinct_count, path.HasField("numeric")) == (2, 4, False)

    # The view's baselines are exactly what training computes with fresco.features.statistics.
    view = catalog.views["trips"].view
    frame = {f.name: [] for f in view.features}
    for i, r in enumerate(pq.read_table(source).to_pylist()):
        if i != 5:
            for f in view.features:
                frame[f.name].append(r[f.name])
    expected = baselines({f.name: summarize(f, frame[f.name]) for f in view.features})
    assert catalog.views["trips"].baselines == expected
    assert catalog.views["trips"].baselines["vehicle"].most_frequent == "car"
    assert catalog.views["trips"].baselines["rating"].median == 4.0

    # Stored for the next start, and the latest row per entity written in chunks of two.
    stored = await tier.load_statistics("trips")
    assert stored is not None
    assert convert.decode_statistics(stored)[0] == stats
    records = (await tier.read({"trips": [entity_key([1]), entity_key([5])]}))["trips"]
    assert records[0] is not None
    assert records[0].features["fare"] == 30.0
    assert records[0].event_ts == T0 + 180
    assert records[1] is None  # its only row was rejected
    assert tier.batches == [2, 2, 1, 1]
    phases = [s.phase for s in steps]
    assert phases[0] == "rows"
    assert phases[-1] == "statistics"
    rows = [(s.done, s.total) for s in steps if s.phase == "rows"]
    assert (rows[0], rows[-1]) == ((0, 7), (7, 7))
    assert [done for done, _ in rows] == sorted(done for done, _ in rows)
    assert [(s.done, s.total) for s in steps if s.phase == "statistics"][-1] == (5, 5)


async def test_csv_with_mapping_ranges_and_parse_problems(materializer, tier, tmp_path: Path) -> None:
    source = tmp_path / "trips.csv"
    source.write_text(
        "id,price,kind,stars,vip,route,ts\n"
        '1,10.5,car,5,true,"[1, 2]",2026-01-01T00:00:00Z\n'
        "2,abc,car,4,false,,2026-01-01T01:00:00\n"
        "3,12,NA,4.5,yes,[],2026-01-01T02:00:00+00:00\n"
        "4,13,van,3,maybe,[x],2026-01-01T03:00:00Z\n"
        "5,14,van,3,no,,\n"
        "6,15,van,3,no,,not a time\n"
        "7,16,van,3,no,,2025-12-31T00:00:00Z\n"
        "8,17,van,3,1,,2026-01-02T00:00:00Z\n"
    )
    spec = MaterializeSpec(
        "trips",
        source.as_uri(),
        join_key_columns={"driver_id": "id"},
        feature_columns={"fare": "price", "vehicle": "kind", "rating": "stars", "premium": "vip", "path": "route"},
        event_timestamp_column="ts",
        start_s=T0,
        end_s=T0 + 86_400,
    )
    outcome = await materializer.run(spec)
    # Rows 7 (before start) and 8 (at the exclusive end) are out of range and not read.
    assert outcome.rows_read == 6
    problems = {r.row_index: [(p.feature, p.code) for p in r.problems] for r in outcome.rejections.rows}
    assert problems == {
        1: [("fare", Violation.UNPARSEABLE)],
        2: [("rating", Violation.UNPARSEABLE)],
        3: [("premium", Violation.UNPARSEABLE), ("path", Violation.UNPARSEABLE)],
        4: [("", Violation.MISSING_EVENT_TIMESTAMP)],
        5: [("ts", Violation.UNPARSEABLE)],
    }
    assert outcome.rows_written == 1
    (record,) = (await tier.read({"trips": [entity_key([1])]}))["trips"]
    assert record is not None
    assert record.features == {"fare": 10.5, "vehicle": "car", "rating": 5, "premium": True, "path": [1.0, 2.0]}
    assert record.event_ts == T0


async def test_dry_run_writes_nothing(materializer, catalog, tier, tmp_path: Path) -> None:
    outcome = await materializer.run(MaterializeSpec("trips", str(trips(tmp_path / "t.parquet")), dry_run=True))
    assert (outcome.rows_written, outcome.statistics.row_count) == (0, 6)
    assert tier.batches == []
    assert await tier.load_statistics("trips") is None
    assert catalog.views["trips"].statistics is None


async def test_future_event_times_are_rejected(materializer, tmp_path: Path) -> None:
    path = tmp_path / "future.parquet"
    columns = {"driver_id": [1, 2], "fare": [1.0, 2.0], "vehicle": ["car", "car"], "rating": [1, 2]}
    columns |= {"premium": [True, True], "path": [[], []], "when": [time.time() + 86_400, time.time()]}
    pq.write_table(pa.table(columns), path)
    outcome = await materializer.run(MaterializeSpec("trips", str(path), event_timestamp_column="when"))
    assert outcome.rows_written == 1  # epoch seconds are event times too
    assert [p.code for r in outcome.rejections.rows for p in r.problems] == [Violation.EVENT_TIMESTAMP_OUT_OF_RANGE]


@pytest.mark.parametrize(
    ("spec", "error", "words"),
    [
        (MaterializeSpec("nope", "x.parquet"), NotFound, ["nope"]),
        (MaterializeSpec("trips", ""), InvalidArgument, ["source_uri"]),
        (MaterializeSpec("trips", "s3://bucket/x.parquet"), InvalidArgument, ["source_uri", "s3"]),
        (MaterializeSpec("trips", "file://host/x.parquet"), InvalidArgument, ["source_uri", "host"]),
        (MaterializeSpec("trips", "{data}/missing.parquet"), NotFound, ["source_uri", "missing.parquet"]),
        (MaterializeSpec("trips", "{data}/t.txt"), InvalidArgument, ["format", ".parquet"]),
        (MaterializeSpec("trips", "{data}/t.parquet", event_timestamp_column="when"), InvalidArgument, ["when"]),
        (
            MaterializeSpec("trips", "{data}/t.parquet", feature_columns={"nope": "x"}),
            InvalidArgument,
            ["feature_columns"],
        ),
        (MaterializeSpec("trips", "{data}/t.parquet", format="csv"), InvalidArgument, ["csv"]),
    ],
)
async def test_bad_sources(materializer, tmp_path: Path, spec, error, words) -> None:
    trips(tmp_path / "t.parquet")
    (tmp_path / "t.txt").write_text("driver_id\n1\n")
    spec = MaterializeSpec(**{**spec.__dict__, "source": spec.source.replace("{data}", str(tmp_path))})
    with pytest.raises(error) as caught:
        await materializer.run(spec)
    for word in words:
        assert word in str(caught.value)


async def test_sources_outside_the_allowed_directories_are_refused(catalog, tier, tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    trips(tmp_path / "t.parquet")
    store = TieredStore(MemoryCache(), None, tier, None)
    materializer = Materializer(catalog, store, tier, source_dirs=[allowed])
    with pytest.raises(PermissionDenied, match="outside"):
        await materializer.run(MaterializeSpec("trips", str(tmp_path / "t.parquet")))
    outcome = await materializer.run(MaterializeSpec("trips", str(trips(allowed / "t.parquet"))))
    assert outcome.rows_written == 5
    await store.close()


async def test_no_source_directories_configured_refuses_every_file(catalog, tier, tmp_path: Path) -> None:
    store = TieredStore(MemoryCache(), None, tier, None)
    materializer = Materializer(catalog, store, tier)  # the service's default: no directories
    with pytest.raises(FailedPrecondition, match="--materialize-source-dirs") as caught:
        await materializer.run(MaterializeSpec("trips", str(trips(tmp_path / "t.parquet"))))
    assert "MATERIALIZE_SOURCE_DIRS" in str(caught.value)
    assert tier.batches == []
    await store.close()


async def test_symlinks_and_dot_dot_are_resolved_before_the_check(catalog, tier, tmp_path: Path) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    secret = trips(outside / "secret.parquet")
    (allowed / "link.parquet").symlink_to(secret)
    (allowed / "dir").symlink_to(outside, target_is_directory=True)
    store = TieredStore(MemoryCache(), None, tier, None)
    materializer = Materializer(catalog, store, tier, source_dirs=[allowed])
    for source in (
        allowed / "link.parquet",
        allowed / "dir" / "secret.parquet",
        f"{allowed}/../outside/secret.parquet",
        (allowed / "link.parquet").as_uri(),
    ):
        with pytest.raises(PermissionDenied, match="materialize_source_dirs"):
            await materializer.run(MaterializeSpec("trips", str(source)))
    assert tier.batches == []
    await store.close()


async def test_errors_never_echo_the_file(materializer, tmp_path: Path) -> None:
    secret = "root:x:0:0:TOPSECRET"
    header = "driver_id,fare,vehicle,rating,premium,path,event_timestamp\n"
    # A line with another number of fields (Arrow quotes it in its error), and a header without the columns.
    (tmp_path / "passwd.csv").write_text(f"{header}{secret},1,2,3\n")
    (tmp_path / "other.csv").write_text(f"{secret}\n1\n")
    for name, words in (("passwd.csv", "not a valid csv"), ("other.csv", "has no column(s)")):
        with pytest.raises(InvalidArgument) as caught:
            await materializer.run(MaterializeSpec("trips", str(tmp_path / name)))
        assert "TOPSECRET" not in str(caught.value)
        assert name in str(caught.value)
        assert words in str(caught.value)
    # Cells that do not parse are described, not quoted, in the rejections.
    (tmp_path / "cells.csv").write_text(
        f"{header}1,{secret},car,4,true,,2026-01-01T00:00:00Z\n2,1.5,car,4,true,,{secret}\n"
    )
    outcome = await materializer.run(MaterializeSpec("trips", str(tmp_path / "cells.csv")))
    assert outcome.rejections.count == 2
    for rejection in outcome.rejections.rows:
        for problem in rejection.problems:
            assert "TOPSECRET" not in problem.actual
            assert problem.code == Violation.UNPARSEABLE


class FailingTier(CountingTier):
    """SQLite whose second write batch fails, as a tier that went away part way through."""

    async def write(self, view: str, rows: Sequence[tuple[str, Record]]) -> dict[str, Record]:
        if len(self.batches) == 1:
            self.batches.append(-1)
            raise Unavailable("sqlite: gone")
        return await super().write(view, rows)


async def test_a_failed_write_fails_the_materialisation_and_keeps_the_old_statistics(
    catalog: Catalog, tmp_path: Path
) -> None:
    tier = FailingTier(tmp_path / "failing.db")
    await tier.connect()
    store = TieredStore(MemoryCache(), None, tier, None)
    materializer = Materializer(catalog, store, tier, chunk_rows=2, source_dirs=[tmp_path])
    source = trips(tmp_path / "trips.parquet")
    with pytest.raises(Unavailable, match="gone"):
        await materializer.run(MaterializeSpec("trips", str(source)))
    assert await tier.load_statistics("trips") is None
    assert catalog.views["trips"].statistics is None
    # The first chunk (drivers 1 and 2) was written before the failure; nothing was lost or half written.
    first = (await tier.read({"trips": [entity_key([1]), entity_key([2])]}))["trips"]
    assert [r.features["fare"] if r else None for r in first] == [10.0, 20.0]
    # Run again once the tier is back: the whole file, the later row of driver 1 winning.
    outcome = await materializer.run(MaterializeSpec("trips", str(source)))
    assert outcome.rejections.count == 1
    (record,) = (await tier.read({"trips": [entity_key([1])]}))["trips"]
    assert record is not None
    assert record.features["fare"] == 30.0
    assert await tier.load_statistics("trips") is not None
    await store.close()
