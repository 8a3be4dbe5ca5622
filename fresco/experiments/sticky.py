"""Where bandit units keep their first arm: Redis for many gateways, SQLite for one host. The first arm stored
for a unit wins, atomically across processes, and nothing ever replaces it, so re-weighting moves no one.

Both stores key a unit by (experiment key, phase, unit type, unit id) and keep "<allocation>:<arm>" (the
allocation first: it is an integer, so the arm name may hold any character)."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from chassis.errors import Unavailable
from fresco.experiments.evaluator import StickyArms

__all__ = ["RedisStickyArms", "SqliteStickyArms", "StickyArms"]

T = TypeVar("T")

DEFAULT_PREFIX = "fresco:sticky:"
SCRIPT_KEYS = 500  # units per script call: each call holds Redis for its duration
SQLITE_BATCH = 500  # units per statement, under SQLite's smallest limit of bound variables (999)

# Per unit (KEYS[i], proposal ARGV[i + 1]): store the proposal unless the key exists, and answer what is stored.
# ARGV[1] is a TTL in seconds (0: none), renewed at every claim so that an active unit never loses its arm.
_CLAIM = """
local ttl = tonumber(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do
  local stored = redis.call('GET', key)
  if not stored then
    stored = ARGV[i + 1]
    redis.call('SET', key, stored)
  end
  if ttl > 0 then redis.call('EXPIRE', key, ttl) end
  out[i] = stored
end
return out
"""
# EVALSHA: only the digest travels.
_CLAIM_SHA = hashlib.sha1(_CLAIM.encode(), usedforsecurity=False).hexdigest()


def encode(arm: str, allocation: int) -> str:
    """The stored form of a unit's arm."""
    return f"{allocation}:{arm}"


def decode(value: str | bytes) -> tuple[str, int]:
    """(arm, allocation) from the stored form."""
    text = value.decode() if isinstance(value, bytes) else value
    allocation, _, arm = text.partition(":")
    return arm, int(allocation)


class RedisStickyArms:
    """Units' first arms under `<prefix>{<experiment>}:<phase>:<unit type>:<unit id>` (the braces are a Redis Cluster
    hash tag: one experiment's units share a slot, so one script may touch many); one round trip per claim
    (one script per SCRIPT_KEYS units, pipelined). The caller owns the client. A TTL, when given, is renewed
    at every claim of the unit. Redis errors become chassis Unavailable("redis: ...")."""

    def __init__(self, client: Redis, prefix: str = DEFAULT_PREFIX, ttl_seconds: int | None = None) -> None:
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds: expected a positive number of seconds or None, got {ttl_seconds}")
        self.client = client
        self.prefix = prefix
        self.ttl_seconds = ttl_seconds

    def key(self, experiment_key: str, phase: int, unit_type: str, unit_id: str) -> str:
        """The Redis key of one unit's arm."""
        return f"{self.prefix}{{{experiment_key}}}:{phase}:{unit_type}:{unit_id}"

    async def claim(
        self, experiment_key: str, phase: int, unit_type: str, proposals: Mapping[str, tuple[str, int]]
    ) -> dict[str, tuple[str, int]]:
        """For each unit id, the (arm, allocation) stored first, storing the proposal when there is none."""
        if not proposals:
            return {}
        units = list(proposals)
        ttl = self.ttl_seconds or 0
        chunks = [units[i : i + SCRIPT_KEYS] for i in range(0, len(units), SCRIPT_KEYS)]
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for chunk in chunks:
                keys = [self.key(experiment_key, phase, unit_type, u) for u in chunk]
                pipe.evalsha(_CLAIM_SHA, len(keys), *keys, ttl, *(encode(*proposals[u]) for u in chunk))
            try:
                replies = await pipe.execute()
                break
            except NoScriptError as exc:
                if attempt:
                    raise Unavailable(f"redis: the claim script is missing after loading it: {exc}") from exc
                await self._load_script()  # a new or restarted Redis, or one whose scripts were flushed
            except (RedisError, OSError) as exc:
                raise Unavailable(f"redis: {type(exc).__name__}: {exc}") from exc
        values = [value for reply in replies for value in reply]
        return {unit: decode(value) for unit, value in zip(units, values, strict=True)}

    async def _load_script(self) -> None:
        try:
            await self.client.script_load(_CLAIM)
        except (RedisError, OSError) as exc:
            raise Unavailable(f"redis: {type(exc).__name__}: {exc}") from exc


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sticky_arms (
    experiment_key TEXT NOT NULL,
    phase INTEGER NOT NULL,
    unit_type TEXT NOT NULL,
    unit_id TEXT NOT NULL,
    arm TEXT NOT NULL,
    allocation INTEGER NOT NULL,
    PRIMARY KEY (experiment_key, phase, unit_type, unit_id)
) WITHOUT ROWID;
"""


class SqliteStickyArms:
    """Units' first arms in one SQLite file (WAL; several processes may share it) or ":memory:". Every sqlite3
    call runs on one thread of the store's own, off the event loop; errors become Unavailable("sqlite: ...")."""

    def __init__(self, path: str | Path = ":memory:", busy_timeout_s: float = 10.0) -> None:
        self.path = str(path)
        self.busy_timeout_s = busy_timeout_s
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sticky-sqlite")
        self._conn: sqlite3.Connection | None = None  # opened on, and used only by, the executor's thread
        self._closed = False

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
            _enable_wal(conn, time.monotonic() + self.busy_timeout_s)
            # NORMAL: a commit survives a crash of the process, not a power loss. A claim forgotten that way is
            # proposed again by the same hash under the same weights, so fsyncing every request is not worth it.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            self._conn = conn
        return self._conn

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise Unavailable(f"sqlite: {self.path} is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: work(self._connection()))
        except (sqlite3.Error, OSError) as exc:  # locked past the busy timeout, disk full, I/O errors
            raise Unavailable(f"sqlite: {self.path}: {exc}") from exc

    async def claim(
        self, experiment_key: str, phase: int, unit_type: str, proposals: Mapping[str, tuple[str, int]]
    ) -> dict[str, tuple[str, int]]:
        """For each unit id, the (arm, allocation) stored first, storing the proposal when there is none."""
        if not proposals:
            return {}
        group = (experiment_key, phase, unit_type)
        items = dict(proposals)

        def work(conn: sqlite3.Connection) -> dict[str, tuple[str, int]]:
            # A stored arm never changes, so units already stored are read without a write lock; only the
            # others take one (IMMEDIATE: the insert and the read back see no other writer in between).
            stored = _select(conn, group, list(items))
            missing = [u for u in items if u not in stored]
            if missing:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany(
                        "INSERT OR IGNORE INTO sticky_arms VALUES (?, ?, ?, ?, ?, ?)",
                        [(*group, u, *items[u]) for u in missing],
                    )
                    stored.update(_select(conn, group, missing))
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            return {u: stored[u] for u in items}

        return await self._run(work)

    async def close(self) -> None:
        """Close the connection (on its thread) and stop the thread."""
        if self._closed:
            return
        self._closed = True

        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=True)


def _enable_wal(conn: sqlite3.Connection, deadline: float) -> None:
    # Switching a new file to WAL fails at once with SQLITE_BUSY, without the busy handler, while another process
    # opens it too: retried here until the busy timeout.
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _select(conn: sqlite3.Connection, group: tuple[str, int, str], units: list[str]) -> dict[str, tuple[str, int]]:
    found: dict[str, tuple[str, int]] = {}
    for start in range(0, len(units), SQLITE_BATCH):
        chunk = units[start : start + SQLITE_BATCH]
        rows = conn.execute(
            "SELECT unit_id, arm, allocation FROM sticky_arms WHERE experiment_key = ? AND phase = ? "
            f"AND unit_type = ? AND unit_id IN ({','.join('?' * len(chunk))})",
            (*group, *chunk),
        )
        found.update({unit: (arm, int(allocation)) for unit, arm, allocation in rows})
    return found
