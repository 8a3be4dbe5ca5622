"""The parity check's offline index over real files: point-in-time lookups, history kept, the entity cap,
sources that moved or changed, the sources a view remembers, how served and offline values compare, and
the outcome of each kind of served record."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest
from prometheus_client import CollectorRegistry

from feature_service import convert
from feature_service.materialize import Materializer
from feature_service.offline_index import HISTORY_S, OfflineIndex, build_index
from feature_service.parity import ParityChecker, Sample, same
from feature_service.reader import Catalog
from feature_service.records import entity_key
from feature_service.sources import MAX_SOURCES, Source, remembered
from feature_service.tiers.sqlite import SQLiteTier
from fresco.api.features.v1 import statistics_pb2 as spb
from fresco.features import parse_definitions

DEFINITIONS = """
entities: [{name: customer, join_keys: [{name: customer_id, type: int64}]}]
feature_views:
  - name: customer
    entities: [customer]
    features:
      - {name: income, type: double}
      - {name: age, type: int64, range: {min: 0, max: 130}}
"""
NOW = time.time()


@pytest.fixture
def catalog() -> Catalog:
    return Catalog(parse_definitions(DEFINITIONS))


def materializer(catalog: Catalog, directory: Path) -> Materializer:
    durable = SQLiteTier(directory / "unused.db")  # never connected: the index only reads files
    return Materializer(catalog, durable, durable, source_dirs=[directory])  # type: ignore[arg-type]


def write(path: Path, rows: list[tuple[int, float, int | None, float]]) -> Source:
    """(customer_id, income, age, event time) rows as a Parquet file, and the source materialising it read."""
    ids, incomes, ages, times = (list(column) for column in zip(*rows, strict=True))
    table = pa.table(
        {"customer_id": ids, "income": incomes, "age": pa.array(ages, pa.int64()), "event_timestamp": times}
    )
    pq.write_table(table, path)
    stat = path.stat()
    return Source(str(path.resolve()), "parquet", mtime_ns=stat.st_mtime_ns, size=stat.st_size, materialized_at=NOW)


def values(index: OfflineIndex, key: str, at: float) -> tuple[object, ...] | None:
    row = index.lookup(key, at)
    return None if row is None else row.values


def test_lookups_are_point_in_time_over_every_source(catalog: Catalog, tmp_path: Path) -> None:
    first = write(
        tmp_path / "a.parquet",
        [(1, 1.0, 30, NOW - 9000), (1, 2.0, 31, NOW - 100), (1, 3.0, 999, NOW - 50), (2, 5.0, 40, NOW - 100)],
    )
    second = write(tmp_path / "b.parquet", [(1, 4.0, 33, NOW - 10), (2, 6.0, 41, NOW - 100), (3, 7.0, 50, NOW + 60)])
    index = build_index(catalog.views["customer"], [first, second], materializer(catalog, tmp_path), lambda k: True, 10)
    one, two, three = (entity_key([i]) for i in (1, 2, 3))
    assert index.names == ("income", "age")
    # The row aged 999 is out of range: materialisation rejected it, so it is no offline row either.
    assert [values(index, one, NOW - t) for t in (9000, 100, 60, 10, 0)] == [
        (1.0, 30), (2.0, 31), (2.0, 31), (4.0, 33), (4.0, 33)
    ]  # fmt: skip
    assert index.lookup(one, NOW - 9001) is None
    assert values(index, two, NOW) == (6.0, 41)  # equal event times: the later materialisation
    assert index.lookup(three, NOW) is None  # dated ahead: found only from its own time on
    assert values(index, three, NOW + 60) == (7.0, 50)
    assert (index.holds(entity_key([99])), index.truncated, index.unread) == (True, False, [])


def test_history_before_the_window_keeps_only_the_row_lookups_can_reach(catalog: Catalog, tmp_path: Path) -> None:
    rows = [(1, float(i), 20 + i, NOW - HISTORY_S - 1000 * (5 - i)) for i in range(5)] + [(1, 9.0, 60, NOW - 5)]
    index = build_index(
        catalog.views["customer"], [write(tmp_path / "a.parquet", rows)], materializer(catalog, tmp_path), bool, 10
    )
    held = index.entities[entity_key([1])]
    assert [row.values for row in held.rows] == [(4.0, 24), (9.0, 60)]
    assert values(index, entity_key([1]), index.kept_from) == (4.0, 24)


def test_only_sampled_entities_up_to_the_cap_are_held(catalog: Catalog, tmp_path: Path) -> None:
    source = write(tmp_path / "a.parquet", [(i, float(i), 30, NOW - 10) for i in range(20)])
    odd = {entity_key([i]) for i in range(1, 20, 2)}
    index = build_index(catalog.views["customer"], [source], materializer(catalog, tmp_path), odd.__contains__, 4)
    assert set(index.entities) == {entity_key([i]) for i in (1, 3, 5, 7)}
    assert index.truncated
    assert (index.holds(entity_key([3])), index.holds(entity_key([9]))) == (True, False)


def test_moved_changed_or_foreign_sources_are_not_read(catalog: Catalog, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    changed = write(tmp_path / "in" / "a.parquet", [(1, 1.0, 30, NOW - 10)])
    os.utime(tmp_path / "in" / "a.parquet", ns=(changed.mtime_ns + 10**9, changed.mtime_ns + 10**9))
    gone = write(tmp_path / "in" / "b.parquet", [(2, 2.0, 30, NOW - 10)])
    (tmp_path / "in" / "b.parquet").unlink()
    foreign = write(tmp_path / "c.parquet", [(3, 3.0, 30, NOW - 10)])
    index = build_index(
        catalog.views["customer"], [changed, gone, foreign], materializer(catalog, tmp_path / "in"), bool, 10
    )
    assert index.entities == {}
    assert [reason.split(": ", 1)[1].split()[0] for reason in index.unread] == [
        changed.path,
        "source_uri:",
        "source_uri:",
    ]
    assert "no file" in index.unread[1]
    assert "outside the directories" in index.unread[2]


def test_views_remember_their_latest_sources_once_each() -> None:
    sources = [Source(f"/data/{i}.parquet", "parquet", materialized_at=i) for i in range(MAX_SOURCES + 3)]
    kept: list[Source] = []
    for source in sources:
        kept = remembered(kept, source)
    assert kept == sources[3:]
    again = Source("/data/10.parquet", "parquet", materialized_at=99)
    assert remembered(kept, again)[-1] == again
    assert len(remembered(kept, again)) == MAX_SOURCES
    assert Source.from_dict(again.to_dict()) == again
    windowed = Source("/data/10.parquet", "parquet", start_s=5.0)
    assert len(remembered(kept, windowed)) == MAX_SOURCES  # another window of the file is another source


@pytest.mark.parametrize(
    ("online", "offline", "equal"),
    [
        (1.0, 1.0 + 1e-12, True),
        (1.0, 1.0001, False),
        (0, 0.0, True),  # an integer default of a double feature
        (True, 1, False),
        (True, True, True),
        (3, 3, True),
        (2**62 + 1, 2**62, False),
        (float("nan"), float("nan"), True),
        (None, 0.0, False),
        (None, None, True),
        ([1.0, 2.0], [1.0, 2.0 + 1e-13], True),
        ([1.0, 2.0], [1.0], False),
        (["a"], ["b"], False),
        ("web", "web", True),
    ],
)
def test_served_and_offline_values_compare(online: object, offline: object, equal: bool) -> None:
    assert same(online, offline) is equal


def sample(catalog: Catalog, key: str, served_at: float, event_ts: float | None, **values: object) -> Sample:
    entry = catalog.views["customer"]
    written = None if event_ts is None else NOW + 1  # a push's arrival, unless a test says otherwise
    return Sample("customer", key, served_at, event_ts, written, None, True, entry.stored, {}, values)


def counts(checker: ParityChecker) -> dict[str, tuple[int, int, int]]:
    return {f"{v}:{f}": (c.checked, c.mismatched, c.missing_offline) for (v, f), c in checker.counts.items()}


async def test_check_outcomes_stale_samples_and_uncovered_entities(catalog: Catalog, tmp_path: Path) -> None:
    source = write(tmp_path / "a.parquet", [(1, 1.0, 30, NOW - 100), (2, 2.0, 40, NOW + 100), (3, 3.0, 50, NOW - 100)])
    catalog.set_statistics("customer", convert.encode_statistics(spb.FeatureViewStatistics(), {}, [source.to_dict()]))
    registry = CollectorRegistry()
    checker = ParityChecker(catalog, materializer(catalog, tmp_path), registry, sample_rate=1, max_entities=2)
    one, two, three = (entity_key([i]) for i in (1, 2, 3))
    from_file = sample(catalog, one, NOW, NOW - 100, income=1.0, age=31)
    await checker.check(replace(from_file, written_ts=source.materialized_at))
    assert counts(checker) == {"customer:income": (1, 0, 0), "customer:age": (1, 1, 0)}
    assert list(checker.counts[("customer", "age")].examples) == [
        f"customer_id=1 at {convert.utc(NOW)}: online 31, offline 30 (offline row of {convert.utc(NOW - 100)})"
    ]
    # The same event time but pushed (another arrival): not the file's record. A newer one neither.
    await checker.check(from_file)
    await checker.check(sample(catalog, one, NOW, NOW - 50, income=9.0))
    assert counts(checker)["customer:income"] == (3, 0, 2)
    # A record dated ahead of the served time, from the file: looked up at its own time.
    await checker.check(replace(sample(catalog, two, NOW, NOW + 100, income=2.0), written_ts=source.materialized_at))
    assert counts(checker)["customer:income"] == (4, 0, 2)
    # Nothing served where the file has a live row: lost data is a mismatch.
    await checker.check(sample(catalog, one, NOW, None, income=None))
    assert counts(checker)["customer:income"] == (5, 1, 2)
    # Entity 3 is beyond the index's two entities; a sample served under other statistics is stale.
    await checker.check(sample(catalog, three, NOW, NOW - 100, income=3.0))
    old = sample(catalog, one, NOW, NOW - 100, income=1.0)
    catalog.set_statistics("customer", convert.encode_statistics(spb.FeatureViewStatistics(), {"age": 1}, []))
    await checker.check(old)
    dropped = [
        registry.get_sample_value("fresco_feature_parity_samples_dropped_total", {"reason": reason})
        for reason in ("not_indexed", "stale")
    ]
    assert dropped == [1.0, 1.0]
    assert counts(checker)["customer:income"] == (5, 1, 2)
    assert (
        registry.get_sample_value(
            "fresco_feature_parity_checks_total",
            {"view": "customer", "feature": "income", "outcome": "missing_offline"},
        )
        == 2.0
    )
