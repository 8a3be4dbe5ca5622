"""A chunk of a source file as checked rows: each row in the time window either valid (its entity key, event
time and features in the view's types, normalised) or rejected with every problem.

Two paths give the same answers. The cell path converts and checks cell by cell in Python and explains every
problem. The column path converts whole Arrow columns of the common types (numbers, strings, booleans, bytes;
timestamps or epoch seconds) and proves rows valid with vectorised checks; a row it cannot prove valid (a null
where nulls are refused, a value out of range, a type it does not convert) goes to the cell path, which
rejects or accepts it as it would any row."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]
import pyarrow.types as pat  # type: ignore[import-untyped]

from feature_service import convert
from feature_service.reader import ViewEntry
from feature_service.records import entity_key
from feature_service.source_file import Columns, declared
from feature_service.writer import Problem, Rejection, Violation, check_event_time, check_features
from fresco.features.definitions import Feature
from fresco.features.policy import INT32_RANGE, INT64_RANGE

_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


@dataclass(frozen=True)
class Window:
    """What decides a row's fate besides its cells: the event-time window [start, end) and `now` (event times
    more than max_future_s after it are refused)."""

    start_s: float | None
    end_s: float | None
    now: float
    max_future_s: float


@dataclass
class ValidRow:
    """A valid row: its index in the file, entity key, event time and normalised features."""

    index: int
    key: str
    event_ts: float
    features: dict[str, Any]


@dataclass
class CheckedChunk:
    """One chunk's rows in the window: how many, the valid ones in file order, the rejected ones."""

    rows_read: int = 0
    valid: list[ValidRow] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)

    def latest(self) -> dict[str, ValidRow]:
        """The latest valid row per entity key (on equal event times, the later row in the file)."""
        kept: dict[str, ValidRow] = {}
        for row in self.valid:
            held = kept.get(row.key)
            if held is None or held.event_ts <= row.event_ts:
                kept[row.key] = row
        return kept


def check_chunk(entry: ViewEntry, columns: Columns, table: pa.Table, first_index: int, window: Window) -> CheckedChunk:
    """The rows of `table` (rows first_index... of the file), checked."""
    times = _column_times(table.column(columns.event_timestamp))
    if times is None:  # event times as text: every row through the cell path
        return _cell_path(entry, columns, table, np.arange(len(table)) + first_index, window)
    seconds, known = times
    in_window = np.ones(len(table), dtype=bool)
    if window.start_s is not None:
        in_window &= seconds >= window.start_s
    if window.end_s is not None:
        in_window &= seconds < window.end_s
    kept = ~known | in_window  # rows without a usable event time stay, to be rejected
    table, seconds, known = table.filter(pa.array(kept)), seconds[kept], known[kept]
    indexes = np.flatnonzero(kept) + first_index
    proven = known & (seconds <= window.now + window.max_future_s)
    converted: dict[str, pa.Array] = {}
    for name, column in [*columns.keys.items(), *columns.features.items()]:
        fast = _fast_column(entry, name, table.column(column))
        if fast is None:
            return _cell_path(entry, columns, table, indexes, window)
        converted[name], ok = fast
        proven &= ok
    slow = _cell_path(entry, columns, table.filter(pa.array(~proven)), indexes[~proven], window)
    chosen = pa.array(proven)
    key_values = [converted[k.name].filter(chosen).to_pylist() for k in entry.join_keys]
    names = list(entry.features)
    feature_values = [converted[name].filter(chosen).to_pylist() for name in names]
    fast_rows = [
        ValidRow(int(i), entity_key(key), float(ts), dict(zip(names, values, strict=True)))
        for i, ts, key, values in zip(
            indexes[proven].tolist(),
            seconds[proven].tolist(),
            zip(*key_values, strict=True),
            zip(*feature_values, strict=True) if names else ([] for _ in range(int(proven.sum()))),
            strict=True,
        )
    ]
    valid = fast_rows if not slow.valid else sorted([*fast_rows, *slow.valid], key=lambda row: row.index)
    return CheckedChunk(len(table), valid, slow.rejections)


def _column_times(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray] | None:
    """Event times as float seconds and where they are usable (non-null, finite), or None for text."""
    arrow = column.type
    if pat.is_timestamp(arrow) or pat.is_date(arrow):
        micros = _micros(column)
        known = ~np.asarray(micros.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        values = micros.fill_null(0).to_numpy().astype(np.int64)
        return values / 1e6, known
    if (pat.is_integer(arrow) or pat.is_floating(arrow)) and not pat.is_uint64(arrow):
        values = column.cast(pa.float64(), safe=False).fill_null(math.nan).to_numpy()  # as float(cell) rounds
        return values, np.isfinite(values)
    return None


def _micros(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Timestamps or dates as int64 microseconds since the epoch, the resolution records keep: digits below the
    microsecond (pandas writes nanoseconds) are dropped, not refused as lost data."""
    arrow = column.type
    return pc.cast(pc.cast(column, pa.timestamp("us", getattr(arrow, "tz", None)), safe=False), pa.int64())


def _fast_column(entry: ViewEntry, name: str, column: pa.ChunkedArray) -> tuple[pa.Array, np.ndarray] | None:
    """A column converted to its Python form's Arrow type and where its cells are proven valid; None when this
    path does not convert this column's type (the cell path does)."""
    if pat.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    arrow, kind = array.type, declared(entry, name)
    feature = entry.features.get(name)
    null_ok = feature is not None and feature.null_policy.strategy != "reject"
    if kind in ("double", "float") and (pat.is_float32(arrow) or pat.is_float64(arrow) or _signed(arrow)):
        array = array.cast(pa.float64(), safe=False)
        values = array.fill_null(0.0).to_numpy()
        ok = ~np.isnan(values) & _range_ok(feature, values)
    elif kind in ("int64", "int32") and _signed(arrow):
        array = array.cast(pa.int64())
        values = array.fill_null(0).to_numpy()
        low, high = INT32_RANGE if kind == "int32" else INT64_RANGE
        ok = (values >= low) & (values <= high) & _range_ok(feature, values)
    elif (
        (kind == "string" and (pat.is_string(arrow) or pat.is_large_string(arrow)))
        or (kind == "bytes" and (pat.is_binary(arrow) or pat.is_large_binary(arrow)))
        or (kind == "bool" and pat.is_boolean(arrow))
    ):
        ok = np.ones(len(array), dtype=bool)
    else:
        return None
    if feature is not None and feature.categories is not None:
        if kind != "string":
            return None
        known = pc.is_in(array, pa.array(feature.categories, array.type)).fill_null(False)
        ok &= known.to_numpy(zero_copy_only=False).astype(bool)
    nulls = np.asarray(array.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    ok = np.where(nulls, null_ok, ok)
    return array, ok


def _signed(arrow: pa.DataType) -> bool:
    return pat.is_integer(arrow) and not pat.is_unsigned_integer(arrow)


def _range_ok(feature: Feature | None, values: np.ndarray) -> np.ndarray:
    """Where values are within the feature's range (bounds compared exactly, integers as integers)."""
    ok = np.ones(len(values), dtype=bool)
    if feature is None or feature.range is None:
        return ok
    low, high = feature.range.min, feature.range.max
    if values.dtype.kind == "i":
        # An integer is at least `low` exactly when it is at least ceil(low); bounds beyond int64 decide alone.
        if low is not None:
            ok &= _at_least(values, low)
        if high is not None:
            ok &= ~_at_least(values, math.nextafter(high, math.inf) if isinstance(high, float) else high + 1)
        return ok
    if low is not None:
        ok &= values >= float(low)
    if high is not None:
        ok &= values <= float(high)
    return ok


def _at_least(values: np.ndarray, bound: float) -> np.ndarray:
    """Where int64 values are >= bound, compared exactly."""
    if isinstance(bound, float) and not math.isfinite(bound):
        # NaN: proves nothing (the cell path decides); infinities: every value or none.
        return np.full(len(values), bound < 0)
    ceiling = math.ceil(bound)
    if ceiling < INT64_RANGE[0] or ceiling > INT64_RANGE[1]:
        return np.full(len(values), ceiling < 0)
    return values >= ceiling


# The cell path.


def _cell_path(
    entry: ViewEntry, columns: Columns, table: pa.Table, indexes: np.ndarray, window: Window
) -> CheckedChunk:
    """Every row of `table` (file rows `indexes`) converted and checked cell by cell, problems explained."""
    out = CheckedChunk()
    if not len(table):
        return out
    problems: dict[int, list[Problem]] = {}
    keys = {
        name: _convert(table.column(col), declared(entry, name), name, problems) for name, col in columns.keys.items()
    }
    features = {
        name: _convert(table.column(col), entry.features[name].type, name, problems)
        for name, col in columns.features.items()
    }
    event_ts = _timestamps(table.column(columns.event_timestamp), columns.event_timestamp, problems)
    for name, values in keys.items():
        expected = f"{declared(entry, name)} join key in column {columns.keys[name]}"
        for i, value in enumerate(values):
            if value is None and not any(p.feature == name for p in problems.get(i, ())):
                problems.setdefault(i, []).append(Problem(name, Violation.MISSING_JOIN_KEY, expected, "null"))
            elif (
                declared(entry, name) == "int32" and value is not None and not INT32_RANGE[0] <= value <= INT32_RANGE[1]
            ):
                problems.setdefault(i, []).append(Problem(name, Violation.TYPE_MISMATCH, expected, str(value)))
    for i, index in enumerate(indexes.tolist()):
        ts = event_ts[i]
        if ts is not None and (
            (window.start_s is not None and ts < window.start_s) or (window.end_s is not None and ts >= window.end_s)
        ):
            continue  # outside the window: not read
        out.rows_read += 1
        found = list(problems.get(i, ()))
        unparsed = {p.feature for p in found}
        if ts is not None and (late := check_event_time(entry, ts, window.now, window.max_future_s, False)):
            found.append(late)
        row = {name: features[name][i] for name in entry.features if name not in unparsed}
        # A cell that did not parse is reported once, as UNPARSEABLE, not again as a null.
        found += [p for p in check_features(entry, row) if p.feature not in unparsed]
        if found or ts is None:
            out.rejections.append(Rejection(index, entry.view.name, found))
            continue
        key = entity_key([keys[k.name][i] for k in entry.join_keys])
        normalised = {name: convert.normalize(f.type, features[name][i]) for name, f in entry.features.items()}
        out.valid.append(ValidRow(index, key, ts, normalised))
    return out


def _convert(column: pa.ChunkedArray, value_type: str, name: str, problems: dict[int, list[Problem]]) -> list[Any]:
    """Cells in `value_type`'s Python form; unparseable cells become None with an UNPARSEABLE problem."""
    if pat.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    arrow = column.type
    if value_type == "string" and (pat.is_integer(arrow) or pat.is_boolean(arrow)):
        column = column.cast(pa.string())  # e.g. a string join key stored as numbers in Parquet
    cells = column.to_pylist()
    parse = _PARSERS[value_type]
    out: list[Any] = []
    for i, cell in enumerate(cells):
        if cell is None or (isinstance(cell, float) and math.isnan(cell)):  # NaN is pandas' null
            out.append(None)
            continue
        try:
            out.append(parse(cell))
        except (ValueError, TypeError, OverflowError):
            problems.setdefault(i, []).append(Problem(name, Violation.UNPARSEABLE, value_type, _described(cell)))
            out.append(None)
    return out


def _described(cell: Any) -> str:
    """A cell that did not parse, described without quoting it: rejections never echo the file's contents."""
    if isinstance(cell, str | bytes):
        return f"{type(cell).__name__} of length {len(cell)}"
    return type(cell).__name__


def _float(cell: Any) -> float:
    if isinstance(cell, bool):
        raise TypeError("bool")
    return float(cell.strip() if isinstance(cell, str) else cell)


def _int(cell: Any) -> int:
    if isinstance(cell, bool):
        raise TypeError("bool")
    if isinstance(cell, int):
        return cell
    number = float(cell) if not isinstance(cell, str) else float(cell.strip())
    if isinstance(cell, str) and cell.strip().lstrip("+-").isdigit():
        return int(cell.strip())  # exact, beyond float precision
    if not number.is_integer():
        raise ValueError("not an integer")
    return int(number)


def _str(cell: Any) -> str:
    if not isinstance(cell, str):
        raise TypeError(type(cell).__name__)
    return cell


def _bool(cell: Any) -> bool:
    text = str(cell).strip().lower()  # bools, 0/1 and the usual words
    if text not in _TRUE and text not in _FALSE:
        raise ValueError("not a boolean")
    return text in _TRUE


def _bytes(cell: Any) -> bytes:
    if not isinstance(cell, (bytes, str)):
        raise TypeError(type(cell).__name__)
    return cell.encode() if isinstance(cell, str) else cell


def _list_of(item: Callable[[Any], Any]) -> Callable[[Any], list[Any]]:
    def parse(cell: Any) -> list[Any]:
        if isinstance(cell, str):
            cell = json.loads(cell)  # CSV cells hold lists as JSON: [1.5, 2.0]
        if not isinstance(cell, list):
            raise TypeError(type(cell).__name__)
        return [item(v) for v in cell]

    return parse


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "double": _float,
    "float": _float,
    "int64": _int,
    "int32": _int,
    "string": _str,
    "bool": _bool,
    "bytes": _bytes,
    "double_list": _list_of(_float),
    "float_list": _list_of(_float),
    "int64_list": _list_of(_int),
    "int32_list": _list_of(_int),
    "string_list": _list_of(_str),
}


def _timestamps(column: pa.ChunkedArray, name: str, problems: dict[int, list[Problem]]) -> list[float | None]:
    """Event times as seconds since the epoch: timestamps (naive ones are UTC), dates, numbers of
    seconds, or ISO-8601 text."""
    arrow = column.type
    if pat.is_timestamp(arrow) or pat.is_date(arrow):
        micros = _micros(column)
        cells: Sequence[Any] = [None if m is None else m / 1e6 for m in micros.to_pylist()]
    else:
        cells = column.to_pylist()
    out: list[float | None] = []
    for i, cell in enumerate(cells):
        value: float | None = None
        try:
            if cell is None:
                problems.setdefault(i, []).append(
                    Problem("", Violation.MISSING_EVENT_TIMESTAMP, f"an event time in column {name}", "null")
                )
            elif isinstance(cell, str):
                parsed = datetime.fromisoformat(cell.strip())
                value = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
            elif isinstance(cell, (int, float)) and not isinstance(cell, bool) and math.isfinite(cell):
                value = float(cell)
            else:
                raise TypeError(type(cell).__name__)
        except (ValueError, TypeError, OverflowError):
            problems.setdefault(i, []).append(
                Problem(name, Violation.UNPARSEABLE, "a timestamp, ISO-8601 text or epoch seconds", _described(cell))
            )
        out.append(value)
    return out
