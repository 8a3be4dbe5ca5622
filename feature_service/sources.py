"""The offline files a view was materialised from, remembered with its stored statistics, so the parity
check can read the same rows again (with the same column mapping and time window) after a restart too."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_SOURCES = 32
"""Sources remembered per view: the oldest go first (their entities then count as missing offline)."""


@dataclass(frozen=True)
class Source:
    """One materialised file: where it is, how its columns map to the view, its window and its identity."""

    path: str
    format: str
    join_key_columns: Mapping[str, str] = field(default_factory=dict)
    feature_columns: Mapping[str, str] = field(default_factory=dict)
    event_timestamp_column: str = "event_timestamp"
    start_s: float | None = None
    end_s: float | None = None
    mtime_ns: int = 0  # the file as it was read: a file changed since is not the one materialised
    size: int = 0
    materialized_at: float = 0.0

    def same_read(self, other: Source) -> bool:
        """Whether both read the same file the same way (a re-materialisation replaces the earlier one)."""
        return (self.path, self.format, dict(self.join_key_columns), dict(self.feature_columns)) == (
            other.path,
            other.format,
            dict(other.join_key_columns),
            dict(other.feature_columns),
        ) and (self.event_timestamp_column, self.start_s, self.end_s) == (
            other.event_timestamp_column,
            other.start_s,
            other.end_s,
        )

    def unchanged(self, path: Path) -> bool:
        """Whether the file at `path` still looks like the one that was materialised (size and mtime)."""
        try:
            stat = path.stat()
        except OSError:
            return False
        return stat.st_mtime_ns == self.mtime_ns and stat.st_size == self.size

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "join_key_columns": dict(self.join_key_columns),
            "feature_columns": dict(self.feature_columns),
            "event_timestamp_column": self.event_timestamp_column,
            "start_s": self.start_s,
            "end_s": self.end_s,
            "mtime_ns": self.mtime_ns,
            "size": self.size,
            "materialized_at": self.materialized_at,
        }

    @staticmethod
    def from_dict(raw: Mapping[str, Any]) -> Source:
        return Source(
            path=str(raw["path"]),
            format=str(raw["format"]),
            join_key_columns=dict(raw.get("join_key_columns", {})),
            feature_columns=dict(raw.get("feature_columns", {})),
            event_timestamp_column=str(raw.get("event_timestamp_column", "event_timestamp")),
            start_s=raw.get("start_s"),
            end_s=raw.get("end_s"),
            mtime_ns=int(raw.get("mtime_ns", 0)),
            size=int(raw.get("size", 0)),
            materialized_at=float(raw.get("materialized_at", 0.0)),
        )


def remembered(previous: Sequence[Source], new: Source) -> list[Source]:
    """The sources after materialising `new`: in materialisation order, a re-read of the same file replacing
    the earlier one, at most MAX_SOURCES."""
    kept = [source for source in previous if not source.same_read(new)]
    return [*kept, new][-MAX_SOURCES:]
