"""Materialisation's two ways of checking a chunk agree: the column path (vectorised, proving rows valid) gives
exactly the cell path's answers (valid rows with their keys, event times and normalised values; rejections with
every problem) on generated tables full of nulls, NaNs, bounds, unknown categories, future event times and
types it leaves to the cell path. And the source file is read in chunks of chunk_rows rows."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
from hypothesis import example, given, settings
from hypothesis import strategies as st

from feature_service.reader import Catalog
from feature_service.source_file import Columns, SourceFile
from feature_service.source_rows import CheckedChunk, Window, _cell_path, check_chunk
from fresco.features import parse_definitions

DEFINITIONS = """
entities:
  - {name: driver, join_keys: [{name: driver_id, type: int64}, {name: region, type: int32}]}
feature_views:
  - name: trips
    entities: [driver]
    features:
      - {name: fare, type: double, range: {min: 0.5, max: 100}}
      - {name: tip, type: double, null_policy: {strategy: reject}}
      - {name: rides, type: int64, range: {min: -2.5, max: 7.5}}
      - {name: seats, type: int32}
      - {name: vehicle, type: string, categories: [car, van]}
      - {name: note, type: string, null_policy: {strategy: reject}}
      - {name: premium, type: bool}
      - {name: blob, type: bytes}
      - {name: path, type: double_list}
  - name: flat
    entities: [driver]
    features:
      - {name: fare, type: double, range: {min: 0.5, max: 100}}
      - {name: tip, type: double, null_policy: {strategy: reject}}
      - {name: rides, type: int64, range: {min: -2.5, max: 7.5}}
      - {name: seats, type: int32}
      - {name: vehicle, type: string, categories: [car, van]}
      - {name: note, type: string, null_policy: {strategy: reject}}
      - {name: premium, type: bool}
      - {name: blob, type: bytes}
"""
NOW = time.time()
CATALOG = Catalog(parse_definitions(DEFINITIONS))
ENTRY = CATALOG.entry("trips")  # a list feature: the cell path converts every row
COLUMNS = Columns.of(ENTRY, {}, {}, "event_timestamp")
FLAT = CATALOG.entry("flat")  # the column path converts every column
FLAT_COLUMNS = Columns.of(FLAT, {}, {}, "event_timestamp")


def mostly(valid: st.SearchStrategy, edges: st.SearchStrategy) -> st.SearchStrategy:
    """Valid values three times in four, so that whole rows are often valid and one cell decides."""
    return st.one_of(valid, valid, valid, edges)


floats = mostly(
    st.floats(-10, 200),
    st.one_of(st.none(), st.just(math.nan), st.sampled_from([0.5, 0.4999999, 100.0, 100.00001, 1e300, -math.inf])),
)
ints = mostly(st.integers(-5, 10), st.one_of(st.none(), st.sampled_from([2**31, -(2**31) - 1, 2**31 - 1, 2**62])))
strings = mostly(st.sampled_from(["car", "van"]), st.one_of(st.none(), st.sampled_from(["bike", "", "Car"])))
times = mostly(st.floats(NOW - 86_400, NOW), st.one_of(st.none(), st.floats(NOW, NOW + 3_600), st.just(math.nan)))


Row = tuple[Any, ...]


def table_of(rows: list[Row]) -> pa.Table:
    columns: list[Any] = list(zip(*rows, strict=True)) if rows else [[]] * 12
    fare, tip, rides, seats, vehicle, note, premium, region, ts, driver, int_fare, path = columns
    return pa.table(
        {
            "driver_id": pa.array(driver, pa.int64()),
            "region": pa.array(region, pa.int64()),
            # fare as floats or, in some tables, as integers: the column path converts both.
            "fare": pa.array(int_fare, pa.int32())
            if rows and rows[0][10] is not None
            else pa.array(fare, pa.float64()),
            "tip": pa.array(tip, pa.float32()),
            "rides": pa.array(rides, pa.int64()),
            "seats": pa.array(seats, pa.int64()),
            "vehicle": pa.array(vehicle, pa.string()),
            "note": pa.array(note, pa.string()).dictionary_encode(),
            "premium": pa.array(premium, pa.bool_()),
            "blob": pa.array([None if v is None else v.encode() for v in vehicle], pa.binary()),
            "path": pa.array(path, pa.list_(pa.float64())),
            "event_timestamp": pa.array(ts, pa.float64()),
        }
    )


row = st.tuples(
    floats,
    floats.filter(lambda v: v is None or (not math.isnan(v) and abs(v) < 1e30)),
    ints,
    ints,
    strings,
    strings,
    st.one_of(st.none(), st.booleans()),
    ints.filter(lambda v: v is None or abs(v) < 2**40),
    times,
    mostly(st.integers(0, 5), st.none()),
    st.one_of(st.none(), st.integers(-3, 120)),
    st.one_of(st.none(), st.lists(st.floats(-1, 1), max_size=2)),
)


def as_compared(chunk: CheckedChunk) -> Row:
    valid = [(r.index, r.key, r.event_ts, _same(r.features)) for r in chunk.valid]
    rejected = [
        (r.row_index, [(p.feature, p.code, p.expected, p.actual) for p in r.problems]) for r in chunk.rejections
    ]
    return chunk.rows_read, valid, rejected


def _same(features: dict[str, Any]) -> list[Row]:
    """Values with their types (1 and 1.0 differ), NaN comparable."""
    return [(k, type(v).__name__, "nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in features.items()]


VALID = (1.5, 2.0, 3, 4, "car", "x", True, 7, NOW - 60, 1, None, None)


def one_cell(index: int, value: object) -> list[Row]:
    """A valid row, the same row with one cell changed, and the valid row again (another entity)."""
    changed: list[Any] = list(VALID)
    changed[index] = value
    return [VALID, tuple(changed), (*VALID[:9], 2, *VALID[10:])]


@settings(max_examples=300, deadline=None)
@example(rows=one_cell(0, 150.0), first=0, window=0)  # a double out of range
@example(rows=one_cell(0, 0.4999999), first=0, window=0)
@example(rows=one_cell(0, math.nan), first=0, window=0)  # NaN is null
@example(rows=one_cell(1, None), first=0, window=0)  # a null refused
@example(rows=one_cell(2, 8), first=0, window=0)  # an integer out of range
@example(rows=one_cell(3, 2**31), first=0, window=0)  # beyond int32
@example(rows=one_cell(4, "bike"), first=0, window=0)  # an unknown category
@example(rows=one_cell(5, None), first=0, window=0)
@example(rows=one_cell(7, None), first=0, window=0)  # a null join key
@example(rows=one_cell(8, NOW + 3_000), first=0, window=0)  # an event time in the future
@example(rows=one_cell(8, None), first=0, window=0)
@example(rows=one_cell(8, NOW - 50_000), first=0, window=1)  # before the window
@example(rows=[(*VALID[:10], 150, *VALID[11:]), (*VALID[:10], 3, *VALID[11:])], first=0, window=0)  # ints
@given(rows=st.lists(row, max_size=12), first=st.integers(0, 1000), window=st.sampled_from([0, 1, 2]))
def test_the_column_path_answers_as_the_cell_path(rows: list[Row], first: int, window: int) -> None:
    table = table_of(rows)
    start, end = [(None, None), (NOW - 43_200, None), (NOW - 43_200, NOW)][window]
    checks = Window(start, end, NOW, 300.0)
    for entry, columns in ((FLAT, FLAT_COLUMNS), (ENTRY, COLUMNS)):
        fast = check_chunk(entry, columns, table, first, checks)
        slow = _cell_path(entry, columns, table, np.arange(len(table)) + first, checks)
        assert as_compared(fast) == as_compared(slow)


def test_a_table_of_valid_rows_takes_the_column_path_whole() -> None:
    rows = [(1.5, 2.0, 3, 4, "car", "x", True, 7, NOW - 60, i, None, [0.5]) for i in range(50)]
    table = table_of(rows)
    flat = check_chunk(FLAT, FLAT_COLUMNS, table, 0, Window(None, None, NOW, 300.0))
    assert [r.features for r in flat.valid] == [
        {k: v for k, v in r.features.items() if k != "path"}
        for r in _cell_path(FLAT, FLAT_COLUMNS, table, np.arange(50), Window(None, None, NOW, 300.0)).valid
    ]
    checked = check_chunk(ENTRY, COLUMNS, table, 0, Window(None, None, NOW, 300.0))
    assert (checked.rows_read, len(checked.valid), checked.rejections) == (50, 50, [])
    assert checked.valid[0].features == {
        "fare": 1.5,
        "tip": 2.0,
        "rides": 3,
        "seats": 4,
        "vehicle": "car",
        "note": "x",
        "premium": True,
        "blob": b"car",
        "path": [0.5],
    }


def test_the_file_is_read_in_chunks_across_row_groups(tmp_path: Path) -> None:
    path = tmp_path / "many.parquet"
    rows = [(1.5, 2.0, 3, 4, "car", "x", True, 7, NOW - 60, i, None, None) for i in range(2_500)]
    pq.write_table(table_of(rows), path, row_group_size=700)
    with SourceFile(ENTRY, COLUMNS, path, "parquet", 1_000) as source:
        chunks = list(source.chunks())
        assert source.total_rows == 2_500
    assert [len(c) for c in chunks] == [1_000, 1_000, 500]
    assert pa.concat_tables(chunks).column("driver_id").to_pylist() == list(range(2_500))


def test_reading_holds_a_row_group_not_the_file(tmp_path: Path) -> None:
    path = tmp_path / "large.parquet"
    rows = 200_000
    rng = np.random.default_rng(3)
    columns = {name: rng.normal(size=rows) for name in ("fare", "tip")}
    table = pa.table(
        {
            "driver_id": np.arange(rows),
            "region": np.ones(rows, dtype=np.int64),
            **columns,
            "event_timestamp": np.full(rows, NOW - 60),
        }
    )
    pq.write_table(table, path, row_group_size=10_000)
    decoded = table.nbytes
    del table
    entry = Catalog(
        parse_definitions(
            """
entities:
  - {name: driver, join_keys: [{name: driver_id, type: int64}, {name: region, type: int32}]}
feature_views:
  - {name: slim, entities: [driver], features: [{name: fare, type: double}, {name: tip, type: double}]}
"""
        )
    ).entry("slim")
    peak, seen = 0, 0
    before = pa.total_allocated_bytes()
    with SourceFile(entry, Columns.of(entry, {}, {}, "event_timestamp"), path, "parquet", 1_000) as source:
        for chunk in source.chunks():
            seen += len(chunk)
            peak = max(peak, pa.total_allocated_bytes() - before)
    assert seen == rows
    assert peak < decoded / 8, (peak, decoded)  # one 10,000-row group is a twentieth of the file


def test_integer_event_times_beyond_float_precision_are_checked_as_the_cell_path_does() -> None:
    table = table_of([VALID, (*VALID[:9], 2, *VALID[10:])])
    seconds = pa.array([int(NOW) - 60, 2**60 + 1], pa.int64())
    table = table.set_column(table.schema.get_field_index("event_timestamp"), "event_timestamp", seconds)
    checks = Window(None, None, NOW, 300.0)
    fast = check_chunk(FLAT, FLAT_COLUMNS, table, 0, checks)
    assert as_compared(fast) == as_compared(_cell_path(FLAT, FLAT_COLUMNS, table, np.arange(2), checks))
    assert [r.row_index for r in fast.rejections] == [1]  # far in the future
