"""What the storage tiers hold: one record per (feature view, entity), its features and event time.

Keys and records have one byte encoding that every tier shares, so a value read from Cassandra can be
put in Redis and in memory as it is.

Order of writes. Every tier keeps, per key, the record whose encoding is the greatest, compared as bytes.
The encoding starts with the event time then the arrival time, each as a fixed-width big-endian number of
microseconds, so comparing encodings is comparing (event time, arrival time, values): the last event wins,
ties broken by arrival (then, for two records that arrived in the same microsecond, by their values, so
every tier picks the same one). Cassandra gets the event time as the write timestamp (USING TIMESTAMP)
and, on equal timestamps, itself keeps the greater value: the same rule."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import msgpack

FORMAT: Final = b"\x01"  # first byte of the encoding; earlier versions wrote a bare msgpack map (0x8?)
EPOCH_OFFSET_US: Final = 62_135_596_800_000_000  # 0001-01-01 is 0, so every stored time is positive
_HEAD = struct.Struct(">QQ")
HEAD_BYTES: Final = len(FORMAT) + _HEAD.size


def micros(seconds: float) -> int:
    """A time as stored: microseconds since 0001-01-01 (the resolution at which writes are ordered)."""
    return round(seconds * 1_000_000) + EPOCH_OFFSET_US


@dataclass(frozen=True)
class Record:
    """The latest values of one entity's features in one view."""

    features: Mapping[str, Any]
    event_ts: float  # seconds since the epoch, when the values were observed
    written_ts: float  # seconds since the epoch, when the service received them (the arrival)
    _encoded: list[bytes] = field(default_factory=list, init=False, repr=False, compare=False, hash=False)

    @property
    def event_us(self) -> int:
        """The event time as ordered and as Cassandra's write timestamp."""
        return micros(self.event_ts)

    def rank(self) -> tuple[int, int]:
        """(event, arrival) in microseconds: the prefix of the encoding that orders writes."""
        return micros(self.event_ts), micros(self.written_ts)

    def encode(self) -> bytes:
        """The bytes every tier stores (computed once)."""
        if not self._encoded:
            body: bytes = msgpack.packb({"f": dict(self.features)}, use_bin_type=True)
            self._encoded.append(FORMAT + _HEAD.pack(*self.rank()) + body)
        return self._encoded[0]

    def head(self) -> bytes:
        """The encoding's ordering prefix alone (event and arrival): a floor for caches (see tiers.redis)."""
        return self.encode()[:HEAD_BYTES]

    def supersedes(self, other: Record) -> bool:
        """Whether this record wins over `other` for the same key (it is not older): see the module docstring."""
        mine, theirs = self.rank(), other.rank()
        if mine != theirs:
            return mine > theirs
        return self.encode() >= other.encode()

    @staticmethod
    def decode(data: bytes) -> Record:
        if data[:1] == FORMAT:
            event_us, written_us = _HEAD.unpack_from(data, 1)
            features = msgpack.unpackb(memoryview(data)[HEAD_BYTES:], raw=False)["f"]
            # Reads decode a record per key: fill the fields directly, without the frozen dataclass's __init__
            # (one object.__setattr__ per field); the same fields, and the encoding known.
            record = _new_record(Record)
            record.__dict__.update(
                features=features,
                event_ts=(event_us - EPOCH_OFFSET_US) / 1_000_000,
                written_ts=(written_us - EPOCH_OFFSET_US) / 1_000_000,
                _encoded=[data if type(data) is bytes else bytes(data)],
            )
            return record
        raw = msgpack.unpackb(data, raw=False)  # written before ordering by event time
        return Record(raw["f"], raw["e"], raw["w"])


_new_record = object.__new__


def latest(rows: Sequence[tuple[str, Record]]) -> dict[str, Record]:
    """One record per key: the one that supersedes the others."""
    out: dict[str, Record] = {}
    for key, record in rows:
        kept = out.get(key)
        if kept is None or record.supersedes(kept):
            out[key] = record
    return out


class ArrivalClock:
    """Arrival times: wall-clock seconds, strictly increasing (by at least a microsecond) within a process, so
    two writes received one after the other are ordered by arrival even within one clock tick."""

    def __init__(self) -> None:
        self._last_us = 0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            now_us = max(round(time.time() * 1_000_000), self._last_us + 1)
            self._last_us = now_us
        return now_us / 1_000_000


arrival_time: Final = ArrivalClock()
"""The process's arrival clock: every written record's written_ts."""


def entity_key(values: Sequence[Any]) -> str:
    """The storage key of an entity from its join-key values in the view's join-key order."""
    packed: bytes = msgpack.packb(list(values), use_bin_type=True)
    return packed.hex()


class Tier(Protocol):
    """One storage tier. Reads are batched: one call (one round trip where the tier is remote) for
    every key of every view of a request."""

    name: str

    async def read(self, keys_by_view: Mapping[str, Sequence[str]]) -> dict[str, list[Record | None]]:
        """For each view, the records of its keys in order; None for keys the tier does not hold."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class DurableTier(Tier, Protocol):
    """The tier of record (Cassandra, or SQLite embedded): what it acknowledged survives restarts."""

    async def write(self, view: str, rows: Sequence[tuple[str, Record]]) -> Mapping[str, Record] | None:
        """Store rows, each only where it supersedes the stored record; durable when this returns. The records
        held for the keys afterwards if the tier knows them at no extra cost, else None."""
        ...

    def keys(self, view: str) -> AsyncIterator[str]:
        """Every key stored for a view (to rebuild bloom filters)."""
        ...

    async def save_statistics(self, view: str, data: bytes) -> None:
        """Store a view's latest materialisation statistics (serialized)."""
        ...

    async def load_statistics(self, view: str) -> bytes | None:
        """A view's latest materialisation statistics, if any."""
        ...
