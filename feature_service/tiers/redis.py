"""L2: Redis as a cache of encoded records, one round trip per batch, failing fast when down.

Every error becomes chassis Unavailable("redis: ...") within about the socket timeout, so the store can
go around it; the pool reconnects by itself when Redis comes back.

Against a Redis Cluster (cluster=True) the keys are the same; a read is one pipeline of an MGET per hash slot
(sent to every primary at once), and the script runs once per slot's keys, since a script may only touch keys of
one slot. A read or write touching a slot whose primary is down fails as a whole with Unavailable.

Writes and fills go through one server-side script that keeps, per key, the record written last by event time
(ties by arrival), so an older event, a replay or a late fill never replaces a newer value."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from chassis.errors import Unavailable
from feature_service.records import FORMAT, HEAD_BYTES, Record

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "fresco:features:"
FLOOR, COMMIT, FILL = b"floor", b"commit", b"fill"
SCRIPT_KEYS = 500  # keys per script call: each call holds Redis for its duration

# Per key (KEYS[i], payload ARGV[1 + 2i], flag ARGV[2 + 2i]) Redis keeps the greatest encoding, compared as
# bytes, which orders records by event time then arrival (see feature_service.records). A "floor" is the head of
# an encoding alone (event and arrival, no values): the durable tier holds something at least that recent that
# Redis does not know, so a read of it misses, and only a fill at least that recent replaces it.
# - floor (before a durable write, or for a write Redis missed): a record older than the head becomes the floor
#   (returns 1: Redis knew the durable tier's record until now); a record at least as recent stays (returns 2);
#   elsewhere the floor is raised to the head (returns 0).
# - commit (after the durable write, flag 1 where the floor returned 1): where the floor this write left is still
#   there, no later write has begun, so the record written is the durable tier's: it replaces the floor (returns
#   1). Anything else stays (returns 0): the writer reads the key back from the durable tier, as a read would.
# - fill (a record read from the durable tier): lands unless something at least as recent is held (returns 0).
# Values of an earlier format (not starting with \x01) count as absent.
_ORDERED_SET = """
local mode, ttl = ARGV[1], tonumber(ARGV[2])
local head_len = 17
local function at_least(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x > y end
  end
  return #a >= #b
end
local out = {}
for i, key in ipairs(KEYS) do
  local new, flag = ARGV[1 + 2 * i], ARGV[2 + 2 * i]
  local cur = redis.call('GET', key)
  if cur and string.byte(cur, 1) ~= 1 then cur = false end
  local is_record = cur and #cur > head_len
  local result = 0
  if mode == 'fill' then
    if not cur or not at_least(cur, new) then redis.call('SET', key, new, 'PX', ttl) end
  elseif mode == 'floor' then
    local floor = string.sub(new, 1, head_len)
    if is_record and at_least(cur, floor) then
      result = 2
    else
      if is_record then result = 1 end
      if not cur or not at_least(cur, floor) then redis.call('SET', key, floor, 'PX', ttl) end
    end
  elseif flag == '1' and cur and not is_record and cur == string.sub(new, 1, head_len) then
    redis.call('SET', key, new, 'PX', ttl)
    result = 1
  end
  out[i] = result
end
return out
"""
# EVALSHA: only the digest travels.
_ORDERED_SET_SHA = hashlib.sha1(_ORDERED_SET.encode(), usedforsecurity=False).hexdigest()


class RedisTier:
    """Records under `<prefix><view>:<key>` with a TTL; a read is one MGET of every key of every view (against a
    cluster: one pipeline of an MGET per hash slot)."""

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        ttl_s: float = 3600.0,
        key_prefix: str = DEFAULT_PREFIX,
        timeout_s: float = 0.3,
        max_connections: int = 64,
        cluster: bool = False,
    ) -> None:
        """cluster: url names one node of a Redis Cluster, from which the client discovers the others."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.url = url
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.key_prefix = key_prefix
        self.cluster = cluster
        # One immediate retry on a connection error only: it replaces a pooled connection the server closed
        # (after a restart) without doubling the wait when Redis hangs (timeouts are not retried).
        retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
        self._client: Redis | RedisCluster
        if cluster:
            # A down primary: one retry after the client re-reads the slot map, then the error, as above.
            self._client = RedisCluster.from_url(
                url,
                max_connections=max_connections,
                socket_connect_timeout=timeout_s,
                socket_timeout=timeout_s,
                socket_keepalive=True,
                retry=retry,
            )
        else:
            pool = BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=timeout_s,  # waiting for a free connection counts against the same budget
                socket_connect_timeout=timeout_s,
                socket_timeout=timeout_s,
                socket_keepalive=True,
                retry=retry,
            )
            self._client = Redis.from_pool(pool)
        self.round_trips = 0

    def _prefix(self, view: str) -> str:
        # Keys are hex, so the last ':' separates view and key even when a view name holds one.
        return f"{self.key_prefix}{view}:"

    async def _execute(self, pipe: Pipeline | ClusterPipeline) -> list[Any]:
        self.round_trips += 1
        try:
            result: list[Any] = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise Unavailable(f"redis: {type(exc).__name__}: {exc}") from exc
        return result

    async def read(self, keys_by_view: Mapping[str, Sequence[str]]) -> dict[str, list[Record | None]]:
        """For each view, its keys' records in order (None where absent): one MGET of every key of every view."""
        names: list[str] = []
        for view, keys in keys_by_view.items():
            prefix = self._prefix(view)
            names += [prefix + key for key in keys]
        if not names:
            return {view: [] for view in keys_by_view}
        self.round_trips += 1
        try:
            # bytes or None: responses are not decoded. A cluster's MGETs, one per slot, go out as one pipeline.
            client = self._client
            values: list[Any] = await (
                client.mget_nonatomic(names) if isinstance(client, RedisCluster) else client.mget(names)
            )
        except (RedisError, OSError) as exc:
            raise Unavailable(f"redis: {type(exc).__name__}: {exc}") from exc
        out: dict[str, list[Record | None]] = {}
        start = 0
        for view, keys in keys_by_view.items():
            out[view] = [None if value is None else _decode(value) for value in values[start : start + len(keys)]]
            start += len(keys)
        return out

    async def floor(self, view: str, heads: Sequence[tuple[str, bytes]]) -> list[int]:
        """Before a durable write, or for writes Redis missed or whose outcome is unknown: raise the keys' floors
        to these heads ((key, head) pairs). Per key 1 where Redis held an older record, 2 where it held one at
        least as recent, else 0 (see _ORDERED_SET)."""
        return await self._apply(view, [(key, head, b"0") for key, head in heads], FLOOR)

    async def commit(self, view: str, rows: Sequence[tuple[str, Record]], floored: Sequence[int]) -> list[bool]:
        """After the durable write of rows whose floor() answered `floored`: per row, whether Redis now holds it."""
        items = [
            (key, record.encode(), b"1" if f == 1 else b"0") for (key, record), f in zip(rows, floored, strict=True)
        ]
        return [bool(flag) for flag in await self._apply(view, items, COMMIT)]

    async def fill(self, view: str, rows: Sequence[tuple[str, Record]]) -> None:
        """Cache records read from the durable tier, where nothing at least as recent (record or floor) is held."""
        await self._apply(view, [(key, record.encode(), b"0") for key, record in rows], FILL)

    async def _apply(self, view: str, items: Sequence[tuple[str, bytes, bytes]], mode: bytes) -> list[int]:
        if not items:
            return []
        prefix = self._prefix(view)
        calls = [items[start : start + SCRIPT_KEYS] for start in range(0, len(items), SCRIPT_KEYS)]
        order = list(range(len(items)))
        if self.cluster:  # one call per slot's keys; the replies are put back in the items' order below
            by_slot: defaultdict[int, list[int]] = defaultdict(list)
            for index, (key, _, _) in enumerate(items):
                by_slot[key_slot((prefix + key).encode())].append(index)
            groups = [group for slot_group in by_slot.values() for group in _chunks(slot_group, SCRIPT_KEYS)]
            calls = [[items[index] for index in group] for group in groups]
            order = [index for group in groups for index in group]
        for attempt in range(2):
            pipe = self._client.pipeline(transaction=False)
            for chunk in calls:
                keys = [prefix + key for key, _, _ in chunk]
                args = [arg for _, payload, flag in chunk for arg in (payload, flag)]
                # As a raw command: redis-py's cluster pipeline blocks its evalsha method, not the command.
                pipe.execute_command("EVALSHA", _ORDERED_SET_SHA, len(keys), *keys, mode, self.ttl_ms, *args)
            try:
                replies = await self._execute(pipe)
                break
            except Unavailable as exc:
                if attempt or not isinstance(exc.__cause__, NoScriptError):
                    raise
                await self._load_script()  # Redis restarted, or flushed its scripts
        out = [0] * len(items)
        for index, flag in zip(order, (flag for reply in replies for flag in reply), strict=True):
            out[index] = int(flag)
        return out

    async def _load_script(self) -> None:
        try:
            await self._client.script_load(_ORDERED_SET)
        except (RedisError, OSError) as exc:
            raise Unavailable(f"redis: {type(exc).__name__}: {exc}") from exc

    async def delete(self, view: str, keys: Sequence[str]) -> None:
        """Remove keys (UNLINK: freed off Redis's main thread)."""
        if not keys:
            return
        prefix = self._prefix(view)
        names = [prefix + key for key in keys]
        groups = [names]
        if self.cluster:  # one UNLINK per slot
            by_slot: defaultdict[int, list[str]] = defaultdict(list)
            for name in names:
                by_slot[key_slot(name.encode())].append(name)
            groups = list(by_slot.values())
        pipe = self._client.pipeline(transaction=False)
        for group in groups:
            pipe.execute_command("UNLINK", *group)  # raw: a cluster pipeline's unlink method is not queued
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
        """Raise Unavailable unless Redis answers now (a cluster: every node)."""
        if isinstance(self._client, RedisCluster):
            self.round_trips += 1
            try:
                await self._client.ping(target_nodes=RedisCluster.ALL_NODES)
            except (RedisError, OSError) as exc:
                raise Unavailable(f"redis: {type(exc).__name__}: {exc}") from exc
            return
        pipe = self._client.pipeline(transaction=False)
        pipe.ping()
        await self._execute(pipe)

    async def close(self) -> None:
        """Close the client and its pool."""
        await self._client.aclose()


class CacheGuard:
    """Whether a RedisTier may be used now: not while it is down (so no request waits for its timeout), nor
    while it may hold values older than a write it missed, until a repair has raised their floors."""

    def __init__(self, tier: RedisTier, *, retry_s: float = 0.5, max_dirty_keys: int = 100_000) -> None:
        self.tier = tier
        self.retry_s = retry_s
        self.max_dirty_keys = max_dirty_keys
        self.epoch = 0  # bumped by each miss and repair, so fills read before them are dropped
        self._down_until = 0.0
        self._clean = True
        # (view, key) → head of the latest write Redis missed, raised as a floor by the repair.
        self._dirty: dict[tuple[str, str], bytes] = {}
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

    async def floor(self, view: str, heads: Sequence[tuple[str, bytes]]) -> list[int] | None:
        """RedisTier.floor if Redis is usable; else None, and the keys are remembered for the repair (the
        caller must make sure other replicas hear of it: see feature_service.redis_misses). Never raises."""
        if self.usable():
            try:
                return await self.tier.floor(view, heads)
            except Unavailable as exc:
                self.failed(exc)
        self.missed(view, heads)
        return None

    async def commit(self, view: str, rows: Sequence[tuple[str, Record]], floored: Sequence[int]) -> list[bool]:
        """RedisTier.commit, or nothing committed if Redis fails now (the floors stay: nothing stale). Never raises."""
        if self.usable():
            try:
                return await self.tier.commit(view, rows, floored)
            except Unavailable as exc:
                self.failed(exc)
        return [False] * len(rows)

    async def fill(self, view: str, rows: Sequence[tuple[str, Record]], epoch: int) -> None:
        """Fill with values read from the durable tier while `epoch` was current. Never raises."""
        if epoch != self.epoch or not self.usable():
            return  # read before a repair: the value may be older than a write Redis missed
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

    def missed(self, view: str, heads: Sequence[tuple[str, bytes]]) -> None:
        """Redis could not be floored for a write ((key, head) pairs): it may serve those keys stale until the
        repair has raised their floors; until then it is not used."""
        self._clean = False
        self.epoch += 1
        if not self._overflow:
            for key, head in heads:
                held = self._dirty.get((view, key))
                if held is None or head > held:
                    self._dirty[(view, key)] = head
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
        """Wait out the pause, then floor what Redis may hold stale (or flush the prefix); True once clean."""
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
                batch = dict(self._dirty)
                self.epoch += 1
                by_view: dict[str, list[tuple[str, bytes]]] = {}
                for (view, key), head in batch.items():
                    by_view.setdefault(view, []).append((key, head))
                for view, heads in by_view.items():
                    await self.tier.floor(view, heads)
                for item, head in batch.items():
                    if self._dirty.get(item) == head:
                        del self._dirty[item]
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
    if value[:1] != FORMAT or len(value) <= HEAD_BYTES:
        # A floor: the record must come from the durable tier. Or a value cached by an earlier version, which
        # cannot be ordered against new writes (they go to another Cassandra table): a miss too.
        return None
    try:
        return Record.decode(value)
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        # A value this version cannot read is a miss: the durable tier has the truth.
        log.warning("undecodable value in redis treated as a miss: %s", exc)
        return None


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def _glob_escape(text: str) -> str:
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)
