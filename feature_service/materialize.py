"""Materialize: load a Parquet or CSV file into the online store, the latest valid row per entity, and
record per-feature statistics as the view's baselines. The service's RPC and `fresco features
materialize` run this same class."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlparse

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]
import pyarrow.csv as pa_csv  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pyarrow.types as pat  # type: ignore[import-untyped]

from chassis.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from feature_service import convert
from feature_service.metrics import FeatureMetrics
from feature_service.reader import Catalog, Store, ViewEntry
from feature_service.records import DurableTier, Record, arrival_time, entity_key
from feature_service.sources import Source, remembered
from feature_service.writer import Problem, Rejection, Rejections, Violation, check_event_time, check_features
from fresco.api.features.v1 import statistics_pb2 as spb
from fresco.features.policy import INT32_RANGE
from fresco.features.statistics import summarize

Format = Literal["parquet", "csv"]
_FORMATS: dict[str, Format] = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


@dataclass(frozen=True)
class MaterializeSpec:
    """What to load: a view, a source file and how its columns map to the view."""

    view: str
    source: str
    format: Format | None = None
    join_key_columns: Mapping[str, str] = field(default_factory=dict)
    feature_columns: Mapping[str, str] = field(default_factory=dict)
    event_timestamp_column: str = "event_timestamp"
    start_s: float | None = None
    end_s: float | None = None
    dry_run: bool = False


@dataclass(frozen=True)
class MaterializeProgress:
    """Where a materialisation is: phase (read, validate, write, statistics), rows done of total."""

    phase: str
    done: int
    total: int


@dataclass
class MaterializeOutcome:
    """What a materialisation did."""

    view: str
    rows_read: int
    rows_written: int
    rejections: Rejections
    statistics: spb.FeatureViewStatistics


Progress = Callable[[MaterializeProgress], None]


class Materializer:
    """Reads, validates, dedupes and writes a source file, then stores its statistics."""

    def __init__(
        self,
        catalog: Catalog,
        store: Store,
        durable: DurableTier,
        metrics: FeatureMetrics | None = None,
        *,
        chunk_rows: int = 5000,
        max_rejections: int = 100,
        max_future_s: float = 300.0,
        source_dirs: Sequence[Path] | None = (),
    ) -> None:
        """source_dirs: the directories files may be read from; none refuses every file; None reads any file
        the process can (only for `fresco features materialize` run in process, as the invoking user)."""
        self.catalog = catalog
        self.store = store
        self.durable = durable
        self.metrics = metrics
        self.chunk_rows = chunk_rows
        self.max_rejections = max_rejections
        self.max_future_s = max_future_s
        self.source_dirs = None if source_dirs is None else [d.resolve() for d in source_dirs]
        self._locks: dict[str, asyncio.Lock] = {}

    async def run(self, spec: MaterializeSpec, progress: Progress | None = None) -> MaterializeOutcome:
        """Materialise one file into one view (one at a time per view)."""
        entry = self.catalog.entry(spec.view)
        report = progress or (lambda _: None)
        async with self._locks.setdefault(spec.view, asyncio.Lock()):
            path = self.source_path(spec.source)
            report(MaterializeProgress("read", 0, 1))
            stat = path.stat()  # before reading: a change while it is read makes parity distrust the file
            frame = await asyncio.to_thread(_load, entry, spec, path)
            report(MaterializeProgress("read", 1, 1))
            in_range = frame.in_range(spec.start_s, spec.end_s)
            checked, now = _Checked(Rejections(self.max_rejections)), arrival_time()
            for start in range(0, len(in_range), self.chunk_rows):  # in chunks, so progress shows and the loop breathes
                chunk = in_range[start : start + self.chunk_rows]
                await asyncio.to_thread(self._check_rows, entry, frame, chunk, now, checked)
                report(MaterializeProgress("validate", start + len(chunk), len(in_range)))
            rows = [(key, frame.record(entry, i, now)) for key, i in checked.latest.items()]
            written = 0
            for start in range(0, 0 if spec.dry_run else len(rows), self.chunk_rows):
                await self.store.write(spec.view, rows[start : start + self.chunk_rows], warm=False)
                written = min(start + self.chunk_rows, len(rows))
                report(MaterializeProgress("write", written, len(rows)))
            report(MaterializeProgress("statistics", 0, 1))
            statistics, modes = await asyncio.to_thread(_statistics, entry, spec.source, checked.valid, frame)
            if not spec.dry_run:
                # Saved last: another process watching the statistics knows every record is written when they change.
                source = _source(spec, path, stat.st_mtime_ns, stat.st_size, now)
                previous = await self.durable.load_statistics(spec.view)
                known = [Source.from_dict(s) for s in convert.decode_sources(previous)] if previous else []
                sources = [s.to_dict() for s in remembered(known, source)]
                stored = convert.encode_statistics(statistics, modes, sources)
                await self.durable.save_statistics(spec.view, stored)
                self.catalog.set_statistics(spec.view, stored)
            report(MaterializeProgress("statistics", 1, 1))
            if self.metrics is not None:
                self.metrics.rows.labels(spec.view, "materialize", "accepted").inc(written)
                self.metrics.rows.labels(spec.view, "materialize", "rejected").inc(checked.rejections.count)
            return MaterializeOutcome(spec.view, len(in_range), written, checked.rejections, statistics)

    def source_path(self, source: str) -> Path:
        """The local file a source URI names (a path or file:// URI), within the allowed directories."""
        if not source:
            raise InvalidArgument("source_uri: expected a file path or file:// URI, got an empty string")
        parsed = urlparse(source)
        if parsed.scheme == "file":
            if parsed.netloc not in ("", "localhost"):
                raise InvalidArgument(f"source_uri: expected a local file:// URI, got host {parsed.netloc!r}")
            path = Path(unquote(parsed.path))
        elif parsed.scheme and len(parsed.scheme) > 1:  # one letter is a Windows drive
            raise InvalidArgument(f"source_uri: expected a file path or file:// URI, got scheme {parsed.scheme!r}")
        else:
            path = Path(source)
        if self.source_dirs is not None and not self.source_dirs:
            raise FailedPrecondition(
                "source_uri: this feature service reads no files: start it with --materialize-source-dirs DIR "
                "(FRESCO_FEATURE_SERVICE_MATERIALIZE_SOURCE_DIRS) naming the directories Materialize may read"
            )
        resolved = path.resolve()  # symlinks and .. first: the check is on the file that will be opened
        if self.source_dirs is not None and not any(resolved.is_relative_to(d) for d in self.source_dirs):
            raise PermissionDenied(
                f"source_uri: {source} is outside the directories this service materialises from "
                "(its materialize_source_dirs setting)"
            )
        if not resolved.is_file():
            raise NotFound(f"source_uri: no file at {source}")
        return resolved

    def read_valid(
        self, entry: ViewEntry, source: Source, now: float, keep: Callable[[str], bool]
    ) -> list[tuple[str, Record]]:
        """A remembered source's rows as materialising it at `now` took them (in its window, valid, values
        normalised), in file order, for the entity keys `keep` accepts (blocking: run it in a thread)."""
        spec = MaterializeSpec(
            view=entry.view.name,
            source=source.path,
            format="csv" if source.format == "csv" else "parquet",
            join_key_columns=source.join_key_columns,
            feature_columns=source.feature_columns,
            event_timestamp_column=source.event_timestamp_column,
            start_s=source.start_s,
            end_s=source.end_s,
        )
        frame = _load(entry, spec, Path(source.path))
        checked = _Checked(Rejections(0))
        self._check_rows(entry, frame, frame.in_range(spec.start_s, spec.end_s), now, checked)
        rows = []
        for i in checked.valid:
            key = entity_key([frame.keys[k.name][i] for k in entry.join_keys])
            if keep(key):
                rows.append((key, frame.record(entry, i, now)))
        return rows

    def _check_rows(self, entry: ViewEntry, frame: _Frame, rows: Sequence[int], now: float, checked: _Checked) -> None:
        latest = checked.latest
        for i in rows:
            problems = list(frame.problems.get(i, ()))
            unparsed = {p.feature for p in problems}
            event_ts = frame.event_ts[i]
            if event_ts is not None and (late := check_event_time(entry, event_ts, now, self.max_future_s, False)):
                problems.append(late)
            features = {name: frame.features[name][i] for name in entry.features if name not in unparsed}
            # A cell that did not parse is reported once, as UNPARSEABLE, not again as a null.
            problems += [p for p in check_features(entry, features) if p.feature not in unparsed]
            if problems:
                checked.rejections.add(Rejection(i, entry.view.name, problems))
                continue
            checked.valid.append(i)
            key = entity_key([frame.keys[k.name][i] for k in entry.join_keys])
            kept = latest.get(key)
            if kept is None or (frame.event_ts[kept] or 0.0) <= (event_ts or 0.0):
                latest[key] = i


@dataclass
class _Checked:
    """Rows checked so far: rejections, valid rows (for statistics), the latest valid row per entity key."""

    rejections: Rejections
    valid: list[int] = field(default_factory=list)
    latest: dict[str, int] = field(default_factory=dict)


@dataclass
class _Frame:
    """A source file's columns as Python values in the view's types, with per-row parse problems."""

    keys: dict[str, list[Any]]
    features: dict[str, list[Any]]
    event_ts: list[float | None]
    problems: dict[int, list[Problem]]

    def in_range(self, start: float | None, end: float | None) -> list[int]:
        """Row indexes within [start, end); rows without a timestamp are kept (to be rejected)."""
        return [
            i
            for i, ts in enumerate(self.event_ts)
            if ts is None or ((start is None or ts >= start) and (end is None or ts < end))
        ]

    def record(self, entry: ViewEntry, i: int, now: float) -> Record:
        features = {name: convert.normalize(f.type, self.features[name][i]) for name, f in entry.features.items()}
        return Record(features, self.event_ts[i] or now, now)


def _source(spec: MaterializeSpec, path: Path, mtime_ns: int, size: int, now: float) -> Source:
    return Source(
        path=str(path),
        format=spec.format or _FORMATS.get(path.suffix.lower(), "parquet"),
        join_key_columns=dict(spec.join_key_columns),
        feature_columns=dict(spec.feature_columns),
        event_timestamp_column=spec.event_timestamp_column or "event_timestamp",
        start_s=spec.start_s,
        end_s=spec.end_s,
        mtime_ns=mtime_ns,
        size=size,
        materialized_at=now,
    )


def _load(entry: ViewEntry, spec: MaterializeSpec, path: Path) -> _Frame:
    """Read the mapped columns and convert them to the view's types."""
    key_columns = {k.name: spec.join_key_columns.get(k.name, k.name) for k in entry.join_keys}
    feature_columns = {name: spec.feature_columns.get(name, name) for name in entry.features}
    for what, mapping, known in (
        ("join_key_columns", spec.join_key_columns, key_columns),
        ("feature_columns", spec.feature_columns, feature_columns),
    ):
        if unknown := sorted(set(mapping) - set(known)):
            raise InvalidArgument(f"{what}: {unknown} are not in view {entry.view.name} (expected {sorted(known)})")
    ts_column = spec.event_timestamp_column or "event_timestamp"
    needed = list(dict.fromkeys([*key_columns.values(), *feature_columns.values(), ts_column]))
    fmt = spec.format or _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InvalidArgument(
            f"format: cannot tell the format of {path.name}; expected .parquet or .csv, or set format"
        )
    textual = {
        column
        for name, column in [*key_columns.items(), *feature_columns.items()]
        if _declared(entry, name) in ("string", "bytes") or _declared(entry, name).endswith("_list")
    }
    table = _read_table(path, fmt, needed, textual)
    problems: dict[int, list[Problem]] = {}
    keys = {
        name: _convert(table.column(col), _declared(entry, name), name, problems) for name, col in key_columns.items()
    }
    features = {
        name: _convert(table.column(col), entry.features[name].type, name, problems)
        for name, col in feature_columns.items()
    }
    event_ts = _timestamps(table.column(ts_column), ts_column, problems)
    for name, values in keys.items():
        expected = f"{_declared(entry, name)} join key in column {key_columns[name]}"
        for i, value in enumerate(values):
            if value is None and not any(p.feature == name for p in problems.get(i, ())):
                problems.setdefault(i, []).append(Problem(name, Violation.MISSING_JOIN_KEY, expected, "null"))
            elif (
                _declared(entry, name) == "int32"
                and value is not None
                and not INT32_RANGE[0] <= value <= INT32_RANGE[1]
            ):
                problems.setdefault(i, []).append(Problem(name, Violation.TYPE_MISMATCH, expected, str(value)))
    return _Frame(keys, features, event_ts, problems)


def _declared(entry: ViewEntry, name: str) -> str:
    feature = entry.features.get(name)
    if feature is not None:
        return feature.type
    return next(k.type for k in entry.join_keys if k.name == name)


def _read_table(path: Path, fmt: Format, needed: list[str], textual: set[str]) -> pa.Table:
    try:
        if fmt == "parquet":
            names = pq.read_schema(path).names
        else:
            with pa_csv.open_csv(path) as reader:
                names = reader.schema.names
        if missing := [c for c in needed if c not in names]:
            # The columns asked for, never the file's own header: errors quote nothing from the file.
            raise InvalidArgument(f"source_uri: {path.name} has no column(s) {missing}")
        if fmt == "parquet":
            return pq.read_table(path, columns=needed)
        options = pa_csv.ConvertOptions(
            include_columns=needed,
            # Keys like "007" and categories stay text; only empty cells are null, so a category "NA" survives.
            column_types={c: pa.string() for c in textual},
            null_values=[""],
            strings_can_be_null=True,
        )
        return pa_csv.read_csv(path, convert_options=options)
    except (pa.ArrowException, OSError) as err:
        # Arrow's message quotes the offending lines: only its kind is told, never the file's contents.
        raise InvalidArgument(
            f"source_uri: cannot read {path.name} as {fmt} ({type(err).__name__}): not a valid {fmt} file "
            "with a header row, or one row has a different number of fields"
        ) from None


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
        micros = pc.cast(pc.cast(column, pa.timestamp("us", getattr(arrow, "tz", None))), pa.int64())
        cells: list[Any] = [None if m is None else m / 1e6 for m in micros.to_pylist()]
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


def _statistics(
    entry: ViewEntry, source: str, valid: list[int], frame: _Frame
) -> tuple[spb.FeatureViewStatistics, dict[str, Any]]:
    """Statistics of every feature over the valid rows, and each feature's most frequent value."""
    statistics = spb.FeatureViewStatistics(
        feature_view=entry.view.name,
        source_uri=source,
        row_count=len(valid),
        computed_at=convert.timestamp_of(time.time()),
    )
    times = [t for t in (frame.event_ts[i] for i in valid) if t is not None]
    if times:
        statistics.min_event_time.CopyFrom(convert.timestamp_of(min(times)))
        statistics.max_event_time.CopyFrom(convert.timestamp_of(max(times)))
    modes = {}
    for feature in entry.view.features:
        column = frame.features[feature.name]
        summary = summarize(feature, [convert.normalize(feature.type, column[i]) for i in valid])
        statistics.features.append(convert.summary_to_proto(summary))
        modes[feature.name] = summary.mode
    return statistics, modes
