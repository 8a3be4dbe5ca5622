"""Materialize: load a Parquet or CSV file into the online store, the latest valid row per entity, and
record per-feature statistics as the view's baselines. The service's RPC and `fresco features
materialize` run this same class.

The file is read, checked and written chunk by chunk (materialize_chunk_rows rows), the next chunk read and
checked while the store writes the last, so memory follows the chunk size, not the file (see
feature_service.source_file for CSV). Each chunk writes the latest valid row of each entity in it with an
arrival time later than the chunk before, and every tier keeps the latest record per key (by event time, then
arrival), so the store ends holding each entity's latest row of the file: on equal event times the later
row in the file, as if the whole file had been deduplicated first. Statistics are computed at the end from the
valid values spilled to a temporary file (feature_service.statistics_spill)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from chassis.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from feature_service import convert
from feature_service.metrics import FeatureMetrics
from feature_service.reader import Catalog, Store, ViewEntry
from feature_service.records import DurableTier, Record, arrival_time
from feature_service.source_file import FORMATS, Columns, Format, SourceFile, file_format
from feature_service.source_rows import CheckedChunk, Window, check_chunk
from feature_service.sources import Source, remembered
from feature_service.statistics_spill import StatisticsSpill
from feature_service.writer import Rejections
from fresco.api.features.v1 import statistics_pb2 as spb

__all__ = ["Format", "MaterializeOutcome", "MaterializeProgress", "MaterializeSpec", "Materializer"]


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
    """Where a materialisation is: phase "rows" (rows of the file read, checked and written, of its total) then
    "statistics" (features summarised, of the view's)."""

    phase: str
    done: int
    total: int


@dataclass
class MaterializeOutcome:
    """What a materialisation did. rows_written counts, per chunk, the latest valid row of each entity in it:
    an entity whose rows fall in several chunks counts once per chunk (the store keeps the latest)."""

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
        writes_in_flight: int = 2,
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
        self.writes_in_flight = max(1, writes_in_flight)
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
            stat = path.stat()  # before reading: a change while it is read makes parity distrust the file
            now = arrival_time()
            window = Window(spec.start_s, spec.end_s, now, self.max_future_s)
            rejections = Rejections(self.max_rejections)
            rows_read = written = 0
            source = await asyncio.to_thread(self._open, entry, spec, path)
            spill = StatisticsSpill(entry)
            pending: asyncio.Future[tuple[int, CheckedChunk] | None] | None = None
            writing: dict[asyncio.Future[None], tuple[int, int]] = {}
            try:
                total = source.total_rows
                report(MaterializeProgress("rows", 0, total))
                written_rows = 0

                async def _first_done(tasks: dict[asyncio.Future[None], tuple[int, int]]) -> None:
                    nonlocal written, written_rows
                    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        rows, through = tasks.pop(task)
                        task.result()  # a failed write fails the materialisation (the others finish first)
                        written += rows
                        written_rows = max(written_rows, through)
                    report(MaterializeProgress("rows", written_rows, max(total, written_rows)))

                chunks = _checked_chunks(entry, source, window)
                pending = asyncio.ensure_future(asyncio.to_thread(next, chunks, None))
                done_rows = 0
                arrival = now
                # Shielded: a cancelled call still lets the thread finish its chunk before the file is closed.
                while (checked := await asyncio.shield(pending)) is not None:
                    table_rows, chunk = checked
                    # The next chunk is read and checked while this one is written.
                    pending = asyncio.ensure_future(asyncio.to_thread(next, chunks, None))
                    rows_read += chunk.rows_read
                    for rejection in chunk.rejections:
                        rejections.add(rejection)
                    spill.add(chunk.valid)
                    if not spec.dry_run:
                        rows = [
                            (key, Record(row.features, row.event_ts, arrival)) for key, row in chunk.latest().items()
                        ]
                        # Chunks are written a few at a time: the tiers order records by event time then arrival,
                        # not by the order writes land, so a later chunk overtaking an earlier one changes nothing.
                        while len(writing) >= self.writes_in_flight:
                            await _first_done(writing)
                        writing[asyncio.ensure_future(self.store.write(spec.view, rows, warm=False))] = (
                            len(rows),
                            done_rows + table_rows,
                        )
                        arrival = arrival_time()  # the next chunk's rows arrive after this one's
                    else:
                        report(MaterializeProgress("rows", done_rows + table_rows, total))
                    done_rows += table_rows
                while writing:
                    await _first_done(writing)
                features = len(entry.view.features)
                report(MaterializeProgress("statistics", 0, features))
                statistics, modes = await asyncio.to_thread(
                    spill.statistics,
                    spec.source,
                    lambda done, of: report(MaterializeProgress("statistics", done, of)),
                )
            finally:
                if pending is not None:
                    await asyncio.wait([pending])  # never close the file under a thread still reading it
                if writing:
                    await asyncio.wait(writing)  # writes under way finish (the store shields them anyway)
                    for task in writing:
                        if not task.cancelled():
                            task.exception()  # retrieved: the first failure is the one raised
                await asyncio.to_thread(_close, source, spill)
            if not spec.dry_run:
                # Saved last: another process watching the statistics knows every record is written when they change.
                remembered_source = _source(spec, path, stat.st_mtime_ns, stat.st_size, now)
                previous = await self.durable.load_statistics(spec.view)
                known = [Source.from_dict(s) for s in convert.decode_sources(previous)] if previous else []
                sources = [s.to_dict() for s in remembered(known, remembered_source)]
                stored = convert.encode_statistics(statistics, modes, sources)
                await self.durable.save_statistics(spec.view, stored)
                self.catalog.set_statistics(spec.view, stored)
            if self.metrics is not None:
                self.metrics.rows.labels(spec.view, "materialize", "accepted").inc(written)
                self.metrics.rows.labels(spec.view, "materialize", "rejected").inc(rejections.count)
            return MaterializeOutcome(spec.view, rows_read, written, rejections, statistics)

    def _open(self, entry: ViewEntry, spec: MaterializeSpec, path: Path) -> SourceFile:
        columns = Columns.of(entry, spec.join_key_columns, spec.feature_columns, spec.event_timestamp_column)
        return SourceFile(entry, columns, path, file_format(path, spec.format), self.chunk_rows)

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
        window = Window(spec.start_s, spec.end_s, now, self.max_future_s)
        rows = []
        with self._open(entry, spec, Path(source.path)) as opened:
            for _, chunk in _checked_chunks(entry, opened, window):
                rows += [(row.key, Record(row.features, row.event_ts, now)) for row in chunk.valid if keep(row.key)]
        return rows


def _checked_chunks(entry: ViewEntry, source: SourceFile, window: Window) -> Iterator[tuple[int, CheckedChunk]]:
    """Each chunk of the file checked: its number of rows in the file, and what the check found."""
    columns = source.columns
    first = 0
    for table in source.chunks():
        yield len(table), check_chunk(entry, columns, table, first, window)
        first += len(table)


def _close(source: SourceFile, spill: StatisticsSpill) -> None:
    source.close()
    spill.close()


def _source(spec: MaterializeSpec, path: Path, mtime_ns: int, size: int, now: float) -> Source:
    return Source(
        path=str(path),
        format=spec.format or FORMATS.get(path.suffix.lower(), "parquet"),
        join_key_columns=dict(spec.join_key_columns),
        feature_columns=dict(spec.feature_columns),
        event_timestamp_column=spec.event_timestamp_column or "event_timestamp",
        start_s=spec.start_s,
        end_s=spec.end_s,
        mtime_ns=mtime_ns,
        size=size,
        materialized_at=now,
    )
