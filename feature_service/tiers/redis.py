"""L2: Redis as a cache of encoded records, one pipelined round trip per batch, failing fast when down.

Every error becomes chassis Unavailable("redis: ...") within about the socket timeout, so the store can
go around it; the pool reconnects by itself when Redis comes back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from chassis.errors import Unavailable
from feature_service.records import Record

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "fresco:features:"


class RedisTier:
    """Records under `<prefix><view>:<key>` with a TTL; reads are one MGET per view in one pipeline."""

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        ttl_s: float = 3600.0,
        key_prefix: str = DEFAULT_PREFIX,
        timeout_s: float = 0.3,
        max_connections: int = 64,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.url = url
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.key_prefix = key_prefix
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,  # waiting for a free connection counts against the same budget
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_keepalive=True,
            # One immediate retry on a connection error only: it replaces a pooled connection the server closed
            # (after a restart) without doubling the wait when Redis hangs (timeouts are not retried).
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._client: Redis = Redis.from_pool(pool)
        self.round_trips = 0

    def _prefix(self, view: str) -> str:
        # Keys are hex, so the last ':' separates view and key even when a view name holds one.
        return f"{self.key_prefix}{view}:"

    async def _execute(self, pipe: Pipeline) -> list[Any]:
        self.round_trips += 1
        try:
            result: list[Any] = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise Unavailable(f"redis: {type(exc).__name__}: {exc}") from exc
        return result

    async def read(self, keys_by_view: Mapping[str, Sequence[str]]) -> dict[str, list[Record | None]]:
        """For each view, its keys' records in order (None where absent); one round trip in all."""
        out: dict[str, list[Record | None]] = {view: [] for view in keys_by_view}
        pipe = self._client.pipeline(transaction=False)
        views: list[str] = []
        for view, keys in keys_by_view.items():
            if keys:
                prefix = self._prefix(view)
                pipe.mget([prefix + key for key in keys])
                views.append(view)
        if not views:
            return out
        replies = await self._execute(pipe)
        for view, values in zip(views, replies, strict=True):
            out[view] = [None if value is None else _decode(value) for value in values]
        return out

    async def write(self, view: str, rows: Sequence[tuple[str, Record]]) -> None:
        """SET every row with the TTL, in one round trip."""
        await self._set(view, rows, only_new=False)

    async def fill(self, view: str, rows: Sequence[tuple[str, Record]]) -> None:
        """Like write, but only where the key is not set (SET NX): a fill never overwrites a newer write."""
        await self._set(view, rows, only_new=True)

    async def _set(self, view: str, rows: Sequence[tuple[str, Record]], only_new: bool) -> None:
        if not rows:
            return
        prefix = self._prefix(view)
        pipe = self._client.pipeline(transaction=False)
        for key, record in rows:
            pipe.set(prefix + key, record.encode(), px=self.ttl_ms, nx=only_new)
        await self._execute(pipe)

    async def delete(self, view: str, keys: Sequence[str]) -> None:
        """Remove keys (UNLINK: freed off Redis's main thread)."""
        if not keys:
            return
        prefix = self._prefix(view)
        pipe = self._client.pipeline(transaction=False)
        pipe.unlink(*[prefix + key for key in keys])
        await self._execute(pipe)

    async def flush(self, batch: int = 1000) -> int:
        """Remove every key under the prefix (SCAN + UNLINK, never KEYS or FLUSHDB); how many were removed."""
        removed = 0
        try:
            pending: list[bytes] = []
            async for name in self._client.scan_iter(match=f"{_glob_escape(self.key_prefix)}*", count=batch):
                pending.append(name)
                if len(pending) >= batch:
                    removed += int(await self._client.unlink(*pending))
                    pending.clear()
            if pending:
                removed += int(await self._client.unlink(*pending))
        except (RedisError, OSError) as exc:
            raise Unavailable(f"redis: {type(exc).__name__}: {exc}") from exc
        return removed

    async def ping(self) -> None:
        """Raise Unavailable unless Redis answers now."""
        pipe = self._client.pipeline(transaction=False)
        pipe.ping()
        await self._execute(pipe)

    async def close(self) -> None:
        """Close the client and its pool."""
        await self._client.aclose()


class CacheGuard:
    """Whether a RedisTier may be used now: not while it is down (so no request waits for its timeout), nor
    while it may hold values older than a write it missed, until a repair has deleted them."""

    def __init__(self, tier: RedisTier, *, retry_s: float = 0.5, max_dirty_keys: int = 100_000) -> None:
        self.tier = tier
        self.retry_s = retry_s
        self.max_dirty_keys = max_dirty_keys
        self.epoch = 0  # bumped by each repair, so fills read before it can be dropped
        self._down_until = 0.0
        self._clean = True
        self._dirty: set[tuple[str, str]] = set()  # (view, key) written while Redis missed the write
        self._overflow = False  # too many to list: the whole prefix must be flushed
        self._repair: asyncio.Task[None] | None = None

    def usable(self) -> bool:
        return self._clean and time.monotonic() >= self._down_until

    async def read(self, keys_by_view: Mapping[str, Sequence[str]]) -> dict[str, list[Record | None]]:
        """The tier's read, or Unavailable at once while Redis is down or may hold stale values."""
        if not self.usable():
            raise Unavailable("redis: skipped until it is back and repaired")
        try:
            return await self.tier.read(keys_by_view)
        except Unavailable as exc:
            self.failed(exc)
            raise

    async def write(self, view: str, rows: Sequence[tuple[str, Record]]) -> None:
        """Write through if Redis is usable; otherwise remember the keys for the repair. Never raises."""
        if self.usable():
            try:
                await self.tier.write(view, rows)
                return
            except Unavailable as exc:
                self.failed(exc)
        self.missed(view, [key for key, _ in rows])

    async def fill(self, view: str, rows: Sequence[tuple[str, Record]], epoch: int) -> None:
        """Fill with values read from the durable tier while `epoch` was current (SET NX). Never raises."""
        if epoch != self.epoch or not self.usable():
            return  # read before a repair: the value may be one the repair just deleted
        try:
            await self.tier.fill(view, rows)
        except Unavailable as exc:
            self.failed(exc)

    def failed(self, exc: Exception) -> None:
        """Redis failed a request: skip it for retry_s, and probe it in the background."""
        if self._down_until <= time.monotonic():
            log.warning("redis unavailable, reads go around it: %s", exc)
        self._down_until = time.monotonic() + self.retry_s
        self._start_repair()

    def missed(self, view: str, keys: Sequence[str]) -> None:
        """A write reached the durable tier but not Redis: Redis may serve those keys stale until repaired."""
        self._clean = False
        if not self._overflow:
            self._dirty.update((view, key) for key in keys)
            if len(self._dirty) > self.max_dirty_keys:
                self._dirty.clear()
                self._overflow = True
        self._start_repair()

    def _start_repair(self) -> None:
        if self._repair is None or self._repair.done():
            self._repair = asyncio.create_task(self._repair_loop(), name="redis repair")

    async def _repair_loop(self) -> None:
        while not await self._repair_once():
            self._down_until = time.monotonic() + self.retry_s
            await asyncio.sleep(self.retry_s)

    async def _repair_once(self) -> bool:
        """Wait out the pause, then delete what Redis may hold stale (or flush the prefix); True once clean."""
        await asyncio.sleep(max(0.0, self._down_until - time.monotonic()))
        try:
            await self.tier.ping()
            if self._overflow:
                # Writes from here on are listed again; the flush covers every one before.
                self._overflow = False
                self._dirty.clear()
                self.epoch += 1
                try:
                    removed = await self.tier.flush()
                except Unavailable:
                    self._overflow = True
                    raise
                log.info("redis flushed after missing too many writes: %d keys removed", removed)
            while self._dirty and not self._overflow:
                batch = set(self._dirty)
                self.epoch += 1
                by_view: dict[str, list[str]] = {}
                for view, key in batch:
                    by_view.setdefault(view, []).append(key)
                for view, keys in by_view.items():
                    await self.tier.delete(view, keys)
                self._dirty -= batch
        except Unavailable:
            return False
        if self._dirty or self._overflow:
            return False
        self._clean = True
        self._down_until = 0.0
        log.info("redis is back and holds nothing stale")
        return True

    async def close(self) -> None:
        """Stop repairing."""
        if self._repair is not None:
            self._repair.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._repair


def _decode(value: bytes) -> Record | None:
    try:
        return Record.decode(value)
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        # A value this version cannot read is a miss: the durable tier has the truth.
        log.warning("undecodable value in redis treated as a miss: %s", exc)
        return None


def _glob_escape(text: str) -> str:
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)
