"""What the storage tiers hold: one record per (feature view, entity), its features and event time.

Keys and records have one byte encoding that every tier shares, so a value read from Cassandra can be
put in Redis and in memory as it is."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack


@dataclass(frozen=True)
class Record:
    """The latest values of one entity's features in one view."""

    features: Mapping[str, Any]
    event_ts: float  # seconds since the epoch, when the values were observed
    written_ts: float  # seconds since the epoch, when the values were stored

    def encode(self) -> bytes:
        """The bytes every tier stores."""
        data: bytes = msgpack.packb(
            {"f": dict(self.features), "e": self.event_ts, "w": self.written_ts}, use_bin_type=True
        )
        return data

    @staticmethod
    def decode(data: bytes) -> Record:
        raw = msgpack.unpackb(data, raw=False)
        return Record(raw["f"], raw["e"], raw["w"])


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

    async def write(self, view: str, rows: Sequence[tuple[str, Record]]) -> None:
        """Store rows; for a durable tier, they are durable when this returns."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class DurableTier(Tier, Protocol):
    """The tier of record (Cassandra, or SQLite embedded): what it acknowledged survives restarts."""

    def keys(self, view: str) -> AsyncIterator[str]:
        """Every key stored for a view (to rebuild bloom filters at start)."""
        ...

    async def save_statistics(self, view: str, data: bytes) -> None:
        """Store a view's latest materialisation statistics (serialized)."""
        ...

    async def load_statistics(self, view: str) -> bytes | None:
        """A view's latest materialisation statistics, if any."""
        ...
