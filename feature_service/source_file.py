"""A materialisation source file read in chunks: which columns it must have (the view's join keys, features
and event time, through the spec's column mapping), checked before any row is read, and its rows as Arrow
tables of at most `chunk_rows` rows. Parquet is streamed, so memory follows the chunk, not the file; CSV is
read whole (Arrow's streaming CSV reader fixes each column's type from the first block, and a later block
that does not fit would fail a file the whole-file reader takes)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.csv as pa_csv  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from chassis.errors import InvalidArgument
from feature_service.reader import ViewEntry

Format = Literal["parquet", "csv"]
FORMATS: dict[str, Format] = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class Columns:
    """Where each join key, feature and the event time are in the file."""

    keys: dict[str, str]
    features: dict[str, str]
    event_timestamp: str

    @staticmethod
    def of(
        entry: ViewEntry,
        join_key_columns: Mapping[str, str],
        feature_columns: Mapping[str, str],
        event_timestamp_column: str,
    ) -> Columns:
        """The mapping of a spec (unmapped names read the column of the same name); unknown names refused."""
        keys = {k.name: join_key_columns.get(k.name, k.name) for k in entry.join_keys}
        features = {name: feature_columns.get(name, name) for name in entry.features}
        for what, mapping, known in (
            ("join_key_columns", join_key_columns, keys),
            ("feature_columns", feature_columns, features),
        ):
            if unknown := sorted(set(mapping) - set(known)):
                raise InvalidArgument(f"{what}: {unknown} are not in view {entry.view.name} (expected {sorted(known)})")
        return Columns(keys, features, event_timestamp_column or "event_timestamp")

    def needed(self) -> list[str]:
        return list(dict.fromkeys([*self.keys.values(), *self.features.values(), self.event_timestamp]))


def declared(entry: ViewEntry, name: str) -> str:
    """The declared type of a feature or join key of the view."""
    feature = entry.features.get(name)
    if feature is not None:
        return feature.type
    return next(k.type for k in entry.join_keys if k.name == name)


def file_format(path: Path, given: Format | None) -> Format:
    fmt = given or FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InvalidArgument(
            f"format: cannot tell the format of {path.name}; expected .parquet or .csv, or set format"
        )
    return fmt


class SourceFile:
    """One source file opened for reading in chunks; `close()` (or a with block) releases it."""

    def __init__(self, entry: ViewEntry, columns: Columns, path: Path, fmt: Format, chunk_rows: int) -> None:
        self.path, self.fmt, self.chunk_rows, self.columns = path, fmt, chunk_rows, columns
        needed = columns.needed()
        textual = {
            column
            for name, column in [*columns.keys.items(), *columns.features.items()]
            if declared(entry, name) in ("string", "bytes") or declared(entry, name).endswith("_list")
        }
        self._parquet: pq.ParquetFile | None = None
        self._table: pa.Table | None = None
        with self._errors():
            if fmt == "parquet":
                self._parquet = pq.ParquetFile(path)
                names = self._parquet.schema_arrow.names
            else:
                with pa_csv.open_csv(path) as reader:
                    names = reader.schema.names
            if missing := [c for c in needed if c not in names]:
                # The columns asked for, never the file's own header: errors quote nothing from the file.
                raise InvalidArgument(f"source_uri: {path.name} has no column(s) {missing}")
            if fmt == "csv":
                options = pa_csv.ConvertOptions(
                    include_columns=needed,
                    # Keys like "007" and categories stay text; only empty cells are null, so a category "NA" survives.
                    column_types={c: pa.string() for c in textual},
                    null_values=[""],
                    strings_can_be_null=True,
                )
                self._table = pa_csv.read_csv(path, convert_options=options)
        self._needed = needed
        self.total_rows: int = (
            self._parquet.metadata.num_rows if self._parquet is not None else len(self._table)  # type: ignore[arg-type]
        )

    def chunks(self) -> Iterator[pa.Table]:
        """The rows in file order, `chunk_rows` at a time (the last chunk may be shorter)."""
        if self._table is not None:
            for start in range(0, len(self._table), self.chunk_rows):
                yield self._table.slice(start, self.chunk_rows)
            return
        assert self._parquet is not None
        batches = self._batches(self._parquet)
        pending: list[pa.RecordBatch] = []
        held = 0
        while True:
            with self._errors():
                batch = next(batches, None)
            if batch is None:
                break
            # Row groups end batches early: regroup so every chunk but the last has chunk_rows rows.
            while len(batch):
                take = min(self.chunk_rows - held, len(batch))
                pending.append(batch.slice(0, take))
                held += take
                batch = batch.slice(take)
                if held == self.chunk_rows:
                    yield pa.Table.from_batches(pending)
                    pending, held = [], 0
        if held:
            yield pa.Table.from_batches(pending)

    def _batches(self, parquet: pq.ParquetFile) -> Iterator[pa.RecordBatch]:
        """Record batches one row group at a time: a reader over every row group at once holds on to row groups
        already read (memory then grows with the file)."""
        for group in range(parquet.metadata.num_row_groups):
            yield from parquet.iter_batches(
                batch_size=self.chunk_rows, row_groups=[group], columns=self._needed, use_threads=False
            )

    def _errors(self) -> _ReadErrors:
        return _ReadErrors(self.path, self.fmt)

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        self._table = None

    def __enter__(self) -> SourceFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ReadErrors:
    """Arrow and OS errors as InvalidArgument: only their kind is told, never the file's contents (Arrow's
    messages quote the offending lines)."""

    def __init__(self, path: Path, fmt: Format) -> None:
        self.path, self.fmt = path, fmt

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: object) -> None:
        if err is not None and isinstance(err, (pa.ArrowException, OSError)):
            raise InvalidArgument(
                f"source_uri: cannot read {self.path.name} as {self.fmt} ({type(err).__name__}): not a valid "
                f"{self.fmt} file with a header row, or one row has a different number of fields"
            ) from None
