"""The offline side of the parity check: the rows of the files a view was materialised from, per sampled
entity, ordered by event time for point-in-time lookups. Built once per materialisation (the view's stored
statistics, which name its sources), in a thread, and bounded: only entities the sampler can pick are held,
at most `max_entities` of them, and of each only the rows a lookup from `kept_from` on can still find."""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from chassis.errors import FrescoError
from feature_service import convert
from feature_service.materialize import Materializer
from feature_service.reader import ViewEntry
from feature_service.records import micros
from feature_service.sources import Source

log = logging.getLogger(__name__)

HISTORY_S = 3600.0
"""Of each entity the index keeps the latest row at or before (build time − HISTORY_S) and every later one:
lookups for samples served up to that long before the build stay exact; older samples are not checked."""


@dataclass(frozen=True)
class OfflineRow:
    """One offline row of an entity: its event time and the view's features in definition order."""

    event_ts: float
    values: tuple[Any, ...]


@dataclass
class _Rows:
    """An entity's rows: event times in microseconds (ascending) beside the rows."""

    times: list[int] = field(default_factory=list)
    rows: list[OfflineRow] = field(default_factory=list)


@dataclass
class OfflineIndex:
    """The offline rows of one view as of one stored statistics blob (`stored`), per entity key."""

    view: str
    names: tuple[str, ...]
    stored: bytes | None
    kept_from: float
    entities: dict[str, _Rows] = field(default_factory=dict)
    truncated: bool = False  # more entities were sampled than max_entities: the ones not held are unknown
    arrivals: set[int] = field(default_factory=set)  # the arrival time (µs) of the records of each source read
    unread: list[str] = field(default_factory=list)  # sources that could not be read, with why

    def holds(self, key: str) -> bool:
        """Whether the index can answer for an entity (it has rows for it, or it saw every sampled one)."""
        return key in self.entities or not self.truncated

    def lookup(self, key: str, at: float) -> OfflineRow | None:
        """The entity's latest row with event time at or before `at` (compared in stored microseconds)."""
        rows = self.entities.get(key)
        if rows is None:
            return None
        i = bisect.bisect_right(rows.times, micros(at)) - 1
        return rows.rows[i] if i >= 0 else None

    def row_count(self) -> int:
        return sum(len(rows.rows) for rows in self.entities.values())


def empty_index(entry: ViewEntry) -> OfflineIndex:
    """The index of a view never materialised (or whose blob predates remembered sources): no rows."""
    return OfflineIndex(entry.view.name, tuple(f.name for f in entry.view.features), entry.stored, 0.0)


def build_index(
    entry: ViewEntry,
    sources: Sequence[Source],
    materializer: Materializer,
    keep: Callable[[str], bool],
    max_entities: int,
) -> OfflineIndex:
    """Read every source of a view (blocking) into an index of the entities `keep` accepts. A source outside
    the allowed directories, gone or changed since it was materialised is left out (its rows count as missing)."""
    now = time.time()
    index = empty_index(entry)
    index.kept_from = now - HISTORY_S
    by_key: dict[str, dict[int, OfflineRow]] = {}
    for source in sources:
        try:
            path = materializer.source_path(source.path)
            if not source.unchanged(path):
                raise FrescoError(f"{source.path} changed since it was materialised")
            # Rows as that materialisation took them: its time decides which were too far in the future.
            rows = materializer.read_valid(entry, source, source.materialized_at, keep)
        except FrescoError as err:
            log.warning("parity: source of view %s not read: %s", entry.view.name, err)
            index.unread.append(f"{source.path}: {err}")
            continue
        index.arrivals.add(micros(source.materialized_at))
        for key, record in rows:
            held = by_key.get(key)
            if held is None:
                if len(by_key) >= max_entities:
                    index.truncated = True
                    continue
                held = by_key[key] = {}
            # Equal event times: the later row (file order, then materialisation order) wins, as in the store.
            held[record.event_us] = OfflineRow(record.event_ts, tuple(record.features.get(n) for n in index.names))
    cutoff = micros(index.kept_from)
    for key, held in by_key.items():
        times = sorted(held)
        first = max(bisect.bisect_right(times, cutoff) - 1, 0)  # older rows no lookup from kept_from can find
        index.entities[key] = _Rows(times[first:], [held[t] for t in times[first:]])
    log.info(
        "parity: offline index of %s built: %d entities, %d rows from %d sources%s",
        entry.view.name,
        len(index.entities),
        index.row_count(),
        len(sources) - len(index.unread),
        " (truncated)" if index.truncated else "",
    )
    return index


def sources_of(entry: ViewEntry) -> list[Source]:
    """The sources a view's stored statistics remember."""
    if entry.stored is None:
        return []
    return [Source.from_dict(raw) for raw in convert.decode_sources(entry.stored)]
