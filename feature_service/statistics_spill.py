"""Statistics of a materialisation without holding its rows: each chunk's valid values are appended to a
temporary Parquet file, and at the end each feature's column is read back alone and summarised with
fresco.features.statistics, as the whole column would have been. Memory: a chunk while loading, then one
column (8 bytes a row for numbers) at a time."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from feature_service import convert
from feature_service.reader import ViewEntry
from feature_service.source_rows import ValidRow
from fresco.api.features.v1 import statistics_pb2 as spb
from fresco.features.definitions import NUMERIC_TYPES
from fresco.features.statistics import summarize, summarize_numbers

_ARROW_TYPES: dict[str, pa.DataType] = {
    "double": pa.float64(),
    "float": pa.float64(),
    "int64": pa.int64(),
    "int32": pa.int64(),
    "string": pa.string(),
    "bool": pa.bool_(),
    "bytes": pa.binary(),
    "double_list": pa.list_(pa.float64()),
    "float_list": pa.list_(pa.float64()),
    "int64_list": pa.list_(pa.int64()),
    "int32_list": pa.list_(pa.int64()),
    "string_list": pa.list_(pa.string()),
}


class StatisticsSpill:
    """The valid rows' feature values of one materialisation, on disk until summarised; close() removes them."""

    def __init__(self, entry: ViewEntry) -> None:
        self.entry = entry
        self._schema = pa.schema([(f.name, _ARROW_TYPES[f.type]) for f in entry.view.features])
        self._dir = tempfile.TemporaryDirectory(prefix="fresco-materialize-")
        self._path = Path(self._dir.name) / "valid.parquet"
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0
        self.min_event_ts: float | None = None
        self.max_event_ts: float | None = None

    def add(self, rows: Sequence[ValidRow]) -> None:
        """Append valid rows (in file order)."""
        if not rows:
            return
        columns = [
            pa.array([row.features[f.name] for row in rows], _ARROW_TYPES[f.type]) for f in self.entry.view.features
        ]
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._path, self._schema, compression="none")
        self._writer.write_table(pa.Table.from_arrays(columns, schema=self._schema))
        self.rows += len(rows)
        low = min(row.event_ts for row in rows)
        high = max(row.event_ts for row in rows)
        self.min_event_ts = low if self.min_event_ts is None else min(self.min_event_ts, low)
        self.max_event_ts = high if self.max_event_ts is None else max(self.max_event_ts, high)

    def statistics(
        self, source: str, progress: Callable[[int, int], None] | None = None
    ) -> tuple[spb.FeatureViewStatistics, dict[str, Any]]:
        """Statistics of every feature over the valid rows, and each feature's most frequent value."""
        statistics = spb.FeatureViewStatistics(
            feature_view=self.entry.view.name,
            source_uri=source,
            row_count=self.rows,
            computed_at=convert.timestamp_of(time.time()),
        )
        if self.min_event_ts is not None and self.max_event_ts is not None:
            statistics.min_event_time.CopyFrom(convert.timestamp_of(self.min_event_ts))
            statistics.max_event_time.CopyFrom(convert.timestamp_of(self.max_event_ts))
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        modes = {}
        features = self.entry.view.features
        for done, feature in enumerate(features):
            column = self._column(feature.name)
            if feature.type in NUMERIC_TYPES:
                present = column.drop_null().to_numpy().astype(np.float64)
                present = present[~np.isnan(present)]  # a NaN parsed from text counts as null, as summarize counts it
                summary = summarize_numbers(feature, present, self.rows)
            else:
                summary = summarize(feature, column.to_pylist())
            statistics.features.append(convert.summary_to_proto(summary))
            modes[feature.name] = summary.mode
            if progress is not None:
                progress(done + 1, len(features))
        return statistics, modes

    def _column(self, name: str) -> pa.ChunkedArray:
        if not self.rows:
            return pa.chunked_array([], self._schema.field(name).type)
        return pq.read_table(self._path, columns=[name]).column(0)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._dir.cleanup()
