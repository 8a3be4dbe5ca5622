"""L1: an in-process LRU of decoded records with a TTL per entry, and short-lived negative entries.

A record never replaces a held record it does not supersede (an older event time, see feature_service.records).
Fills from lower tiers carry a token taken before the lower tier was read: a key written or invalidated
since then is not filled, so a slow read never puts back a value older than one a write just stored."""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from feature_service.records import Record


class Absent(enum.Enum):
    """The type of ABSENT: a key known not to exist in any tier."""

    ABSENT = "absent"


ABSENT: Final = Absent.ABSENT

_Key = tuple[str, str]
_Entry = tuple[float, "Record | Absent", int]  # expires at (monotonic), value, approximate bytes


def approximate_size(value: Record | Absent) -> int:
    """A rough byte count of a cached value: enough to bound memory, far cheaper than measuring it."""
    if value is ABSENT:
        return 100
    size = 200 + 64 * len(value.features)
    for item in value.features.values():
        if isinstance(item, str | bytes):
            size += len(item)
        elif isinstance(item, list | tuple):
            size += 16 * len(item)
    return size


class MemoryCache:
    """LRU bounded by entry count (and optionally approximate bytes); positive and negative TTLs apart."""

    name = "memory"

    def __init__(
        self,
        max_entries: int = 100_000,
        ttl_s: float = 300.0,
        negative_ttl_s: float = 5.0,
        max_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_tombstones: int = 65_536,
    ) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries must be at least 0 (0 keeps nothing), got {max_entries}")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.negative_ttl_s = negative_ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()
        self._bytes = 0
        # Keys changed by writes or invalidations, with the generation of the change, to refuse stale fills.
        self._changed: OrderedDict[_Key, int] = OrderedDict()
        self._max_tombstones = max_tombstones
        self._generation = 0
        self._floor = 0  # fills with a token below this are refused whole: their tombstones were dropped
        self.hits = 0
        self.negative_hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """Approximate bytes held (only counted when max_bytes is set)."""
        return self._bytes

    def fill_token(self) -> int:
        """Take before reading a lower tier; pass to put_many/put_absent as `since` when filling from it."""
        return self._generation

    def get_many(self, view: str, keys: Sequence[str]) -> list[Record | Absent | None]:
        """Per key: the record, ABSENT if known absent, or None on a miss (expired entries are misses)."""
        if not self._entries:
            self.misses += len(keys)
            return [None] * len(keys)
        now = self._clock()
        entries = self._entries
        out: list[Record | Absent | None] = []
        hits = negative = 0
        for key in keys:
            ck = (view, key)
            entry = entries.get(ck)
            if entry is None:
                out.append(None)
            elif entry[0] <= now:
                self._drop(ck)
                out.append(None)
            else:
                entries.move_to_end(ck)
                value = entry[1]
                if value is ABSENT:
                    negative += 1
                else:
                    hits += 1
                out.append(value)
        self.hits += hits
        self.negative_hits += negative
        self.misses += len(keys) - hits - negative
        return out

    def put_many(self, view: str, rows: Iterable[tuple[str, Record]], *, since: int | None = None) -> None:
        """Store records. since=None: authoritative (a write); else a fill, skipped for keys changed since."""
        now = self._clock()
        self._put(view, ((key, record) for key, record in rows), now + self.ttl_s, since)

    def put_absent(self, view: str, keys: Iterable[str], *, since: int | None = None) -> None:
        """Remember keys as absent for negative_ttl_s; `since` as for put_many."""
        expires = self._clock() + self.negative_ttl_s
        self._put(view, ((key, ABSENT) for key in keys), expires, since)

    def invalidate(self, view: str, keys: Iterable[str]) -> None:
        """Forget keys (positive or negative), and refuse fills begun before now."""
        self._generation += 1
        for key in keys:
            ck = (view, key)
            if ck in self._entries:
                self._drop(ck)
            self._tombstone(ck)

    def invalidate_view(self, view: str) -> None:
        """Forget every entry of one view (a scan: for rare events such as a reload), and refuse fills begun before."""
        for ck in [ck for ck in self._entries if ck[0] == view]:
            self._drop(ck)
        self._generation += 1
        self._floor = self._generation

    def clear(self) -> None:
        """Forget everything, and refuse every fill begun before now."""
        self._entries.clear()
        self._changed.clear()
        self._bytes = 0
        self._generation += 1
        self._floor = self._generation

    def _put(self, view: str, items: Iterable[tuple[str, Record | Absent]], expires: float, since: int | None) -> None:
        now = self._clock()
        if self.max_entries == 0 or (since is not None and since < self._floor):
            return
        if since is None:
            self._generation += 1
        changed = self._changed
        entries = self._entries
        sized = self.max_bytes is not None
        for key, value in items:
            ck = (view, key)
            if since is None:
                self._tombstone(ck)
            else:
                changed_at = changed.get(ck)
                if changed_at is not None and changed_at > since:
                    continue
            old = entries.get(ck)
            if (
                old is not None
                and isinstance(value, Record)
                and isinstance(old[1], Record)
                and old[0] > now
                and not value.supersedes(old[1])
            ):
                continue  # an older event never replaces a newer one
            entries.pop(ck, None)
            if sized:
                size = approximate_size(value)
                self._bytes += size - (old[2] if old is not None else 0)
            else:
                size = 0
            entries[ck] = (expires, value, size)
        self._evict()

    def _tombstone(self, ck: _Key) -> None:
        changed = self._changed
        changed[ck] = self._generation
        changed.move_to_end(ck)
        if len(changed) > self._max_tombstones:
            _, dropped = changed.popitem(last=False)
            # A fill older than a forgotten change cannot be checked key by key any more.
            self._floor = max(self._floor, dropped)

    def _drop(self, ck: _Key) -> None:
        entry = self._entries.pop(ck)
        self._bytes -= entry[2]

    def _evict(self) -> None:
        entries = self._entries
        max_bytes = self.max_bytes
        while len(entries) > self.max_entries or (max_bytes is not None and self._bytes > max_bytes and entries):
            _, entry = entries.popitem(last=False)
            self._bytes -= entry[2]
            self.evictions += 1

    def stats(self) -> dict[str, Any]:
        """Counters for metrics: hits, negative hits, misses, evictions, entries and bytes."""
        return {
            "hits": self.hits,
            "negative_hits": self.negative_hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "entries": len(self._entries),
            "bytes": self._bytes,
        }
