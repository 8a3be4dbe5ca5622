"""The embedded tier of record: one SQLite file in WAL mode, so Fresco serves features with neither
Redis nor Cassandra. Every blocking sqlite3 call runs on a thread of its own, off the event loop."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from chassis.errors import Unavailable
from chassis.sqlite_threads import SqliteThreads, immediate_transaction
from feature_service.records import FORMAT, Record, latest

T = TypeVar("T")

# Under SQLite's smallest default limit of bound variables (999), leaving room for the view name.
READ_BATCH = 900
KEYS_PAGE = 10_000
SCHEMA_VERSION = 1  # 1: records encoded so that bytes order writes (see feature_service.records)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    view TEXT NOT NULL,
    entity TEXT NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (view, entity)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS statistics (
    view TEXT PRIMARY KEY,
    data BLOB NOT NULL
);
"""


class SQLiteTier:
    """DurableTier over one SQLite file: a write returns once its transaction is fsynced to the WAL.
    Errors surface as chassis Unavailable("sqlite: ..."), as the other tiers report theirs."""

    name = "sqlite"

    def __init__(self, path: Path, busy_timeout_s: float = 10.0) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        # One writer thread serialises transactions; a separate reader thread keeps reads flowing during
        # long writes (WAL lets readers and one writer work at once). Each thread owns its connection.
        self._threads = SqliteThreads(path, "sqlite", busy_timeout_s)

    async def connect(self) -> None:
        """Open the file (creating it and its tables if needed)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise Unavailable(f"sqlite: cannot create the directory of {self.path}: {err.strerror}") from err
        await self._threads.write(lambda conn: conn.executescript(_SCHEMA))
        await self._threads.write(_upgrade_records)

    async def read(self, keys_by_view: Mapping[str, Sequence[str]]) -> dict[str, list[Record | None]]:
        """For each view, the records of its keys in order; None for keys never written."""
        return await self._threads.read(lambda conn: _read(conn, keys_by_view))

    async def write(self, view: str, rows: Sequence[tuple[str, Record]]) -> dict[str, Record]:
        """Store rows in one transaction, each only where it supersedes the stored record (a conditional
        upsert: encodings compare as bytes in the order of writes, see feature_service.records); durable when
        this returns. The records stored for the rows' keys afterwards: the caches take these."""
        if not rows:
            return {}
        data = [(view, key, record.encode()) for key, record in latest(rows).items()]
        keys = [key for _, key, _ in data]

        def work(conn: sqlite3.Connection) -> dict[str, Record]:
            with immediate_transaction(conn):
                conn.executemany(
                    "INSERT INTO records (view, entity, record) VALUES (?, ?, ?) "
                    "ON CONFLICT (view, entity) DO UPDATE SET record = excluded.record "
                    "WHERE excluded.record > records.record",
                    data,
                )
                found = _read(conn, {view: keys}, transaction=False)[view]
            return {key: record for key, record in zip(keys, found, strict=True) if record is not None}

        return await self._threads.write(work)

    async def keys(self, view: str) -> AsyncIterator[str]:
        """Every key stored for a view, page by page."""

        def page_after(after: str) -> Callable[[sqlite3.Connection], list[str]]:
            query = "SELECT entity FROM records WHERE view = ? AND entity > ? ORDER BY entity LIMIT ?"
            return lambda conn: [row[0] for row in conn.execute(query, (view, after, KEYS_PAGE))]

        after = ""
        while True:
            page = await self._threads.read(page_after(after))
            for key in page:
                yield key
            if len(page) < KEYS_PAGE:
                return
            after = page[-1]

    async def save_statistics(self, view: str, data: bytes) -> None:
        """Store a view's latest materialisation statistics."""

        def work(conn: sqlite3.Connection) -> None:
            with immediate_transaction(conn):
                conn.execute(
                    "INSERT INTO statistics (view, data) VALUES (?, ?) "
                    "ON CONFLICT (view) DO UPDATE SET data = excluded.data",
                    (view, data),
                )

        await self._threads.write(work)

    async def load_statistics(self, view: str) -> bytes | None:
        """A view's latest materialisation statistics, if any."""

        def work(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT data FROM statistics WHERE view = ?", (view,)).fetchone()
            return None if row is None else bytes(row[0])

        return await self._threads.read(work)

    async def close(self) -> None:
        """Close every connection (each on its own thread) and stop the threads."""
        await self._threads.close()


def _upgrade_records(conn: sqlite3.Connection) -> None:
    """Re-encode records of the format before writes were ordered by event time, so they compare with new ones
    (once per file: its user_version says it is done)."""
    with immediate_transaction(conn):
        if conn.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            return
        old = conn.execute("SELECT view, entity, record FROM records WHERE substr(record, 1, 1) != ?", (FORMAT,))
        upgraded = [(Record.decode(data).encode(), view, entity) for view, entity, data in old.fetchall()]
        conn.executemany("UPDATE records SET record = ? WHERE view = ? AND entity = ?", upgraded)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _read(
    conn: sqlite3.Connection, keys_by_view: Mapping[str, Sequence[str]], transaction: bool = True
) -> dict[str, list[Record | None]]:
    result: dict[str, list[Record | None]] = {}
    # One read transaction, so every view of a request sees the same snapshot.
    if transaction:
        conn.execute("BEGIN")
    try:
        for view, keys in keys_by_view.items():
            found: dict[str, bytes] = {}
            unique = list(dict.fromkeys(keys))
            for start in range(0, len(unique), READ_BATCH):
                chunk = unique[start : start + READ_BATCH]
                marks = ",".join("?" * len(chunk))
                query = f"SELECT entity, record FROM records WHERE view = ? AND entity IN ({marks})"
                found.update(conn.execute(query, (view, *chunk)).fetchall())
            result[view] = [None if (data := found.get(key)) is None else Record.decode(data) for key in keys]
    finally:
        if transaction:
            conn.execute("COMMIT")
    return result
