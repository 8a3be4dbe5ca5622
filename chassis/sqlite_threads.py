"""One SQLite file used from an event loop through two threads, each with its own connection: a writer that
serialises transactions and a reader that keeps reads flowing during long writes (WAL lets readers and one writer
work at once). synchronous=FULL fsyncs the WAL at every commit: an acknowledged write survives a crash or a power
loss. SQLite's errors (disk full, a lock held past the busy timeout, I/O) become chassis Unavailable("<label>: ...")."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from chassis.errors import Unavailable

T = TypeVar("T")


class SqliteThreads:
    """The writer and reader threads of one SQLite file."""

    def __init__(self, path: Path, label: str, busy_timeout_s: float = 10.0) -> None:
        self.path = path
        self.label = label
        self.busy_timeout_s = busy_timeout_s
        self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"{label}-write")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix=f"{label}-read")
        self._local = threading.local()
        self._closed = False

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
        return conn

    async def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` on the writer's connection."""
        return await self._run(self._writer, work)

    async def read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` on the reader's connection."""
        return await self._run(self._reader, work)

    async def _run(self, pool: ThreadPoolExecutor, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise Unavailable(f"{self.label}: {self.path} is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, lambda: work(self._connection()))
        except sqlite3.Error as err:
            raise Unavailable(f"{self.label}: {self.path}: {err}") from err

    async def close(self) -> None:
        """Finish pending work, close each connection on the thread that made it, stop the threads."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        for pool in (self._writer, self._reader):
            await loop.run_in_executor(pool, self._close_own_connection)
            await loop.run_in_executor(None, pool.shutdown)

    def _close_own_connection(self) -> None:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


@contextmanager
def immediate_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT on a connection in autocommit mode, rolled back on error. IMMEDIATE takes the write
    lock up front: two writers on one file never interleave a transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
