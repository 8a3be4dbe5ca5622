"""The tiered read and write path: memory (L1) → bloom filters → Redis (L2) → the durable tier (L3).

Reads answer whatever they can: a failed tier makes the answer degraded, and keys no tier could answer
are marked UNAVAILABLE rather than failing the whole read. Writes are acknowledged only once durable.
Every tier keeps the last event per key (see records). A write first raises the keys' floors in Redis (see
tiers.redis), so from then on Redis serves none of their older records whatever happens to the writer; then
writes durably; then puts the records in the caches where it can tell they are the latest. That cache work
runs to its end whatever the caller does. A write Redis cannot take is logged durably first, so every replica
floors the keys too (see redis_misses), and Redis is not trusted here until repaired. A write whose outcome is
unknown (a timeout) drops the keys from every memory tier before the error is answered. Bloom filters are
rebuilt from the durable tier every `bloom_refresh_s`."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from chassis.errors import Unavailable
from feature_service.bloom import BloomFilters
from feature_service.invalidation import Invalidator
from feature_service.records import DurableTier, Record, latest
from feature_service.redis_misses import MissFollower, MissLog
from feature_service.tiers.memory import ABSENT, MemoryCache
from feature_service.tiers.redis import CacheGuard, RedisTier

log = logging.getLogger(__name__)


class Marker(enum.Enum):
    """The type of UNAVAILABLE."""

    UNAVAILABLE = "unavailable"


UNAVAILABLE: Final = Marker.UNAVAILABLE
"""In ReadResult.records: no tier that could hold the key answered (the reader applies its null policy)."""

MEMORY: Final = "memory"
BLOOM: Final = "bloom"  # source of a key the bloom filter proved absent: no tier was asked

Observer = Callable[[str, int, int, float], None]
"""Called after each tier is consulted: (tier, hits, misses, seconds)."""


@dataclass
class TierStats:
    """Totals of one tier since start, for metrics."""

    calls: int = 0
    hits: int = 0
    misses: int = 0
    errors: int = 0
    seconds: float = 0.0


@dataclass
class ReadResult:
    """Per view, records in key order (Record, None if absent, UNAVAILABLE) and the tier each came from."""

    records: dict[str, list[Record | Marker | None]]
    sources: dict[str, list[str]]  # "memory", "bloom", "redis", the durable tier's name, or "unavailable"
    served_tiers: list[str] = field(default_factory=list)  # shallowest first
    failed_tiers: list[str] = field(default_factory=list)

    @property
    def degraded(self) -> bool:
        return bool(self.failed_tiers)


class TieredStore:
    """Reads through and fills the tiers above; writes durably, then to the caches, then tells other replicas.

    It owns what it is given: close() closes the tiers and the invalidator."""

    def __init__(
        self,
        memory: MemoryCache,
        cache: RedisTier | None,
        durable: DurableTier,
        blooms: BloomFilters | None = None,
        invalidator: Invalidator | None = None,
        *,
        observer: Observer | None = None,
        cache_retry_s: float = 0.5,
        max_dirty_keys: int = 100_000,
        max_background: int = 1000,
        bloom_refresh_s: float | None = 300.0,
        miss_poll_s: float = 1.0,
    ) -> None:
        self.memory, self.durable = memory, durable
        self.blooms = blooms
        self.invalidator = invalidator
        self.observer = observer
        self.stats: dict[str, TierStats] = {}
        self.max_background = max_background
        self._views: list[str] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writes: set[asyncio.Task[None]] = set()
        self._rebuild: asyncio.Task[None] | None = None
        self._refresh: asyncio.Task[None] | None = None
        self.bloom_refresh_s = bloom_refresh_s
        self._first_pass = asyncio.Event()  # set once a rebuild went over every view (or could not start)
        self.guard = None if cache is None else CacheGuard(cache, retry_s=cache_retry_s, max_dirty_keys=max_dirty_keys)
        self.misses: MissFollower | None = None
        if self.guard is not None and isinstance(durable, MissLog):
            self.misses = MissFollower(durable, self._apply_miss, poll_s=miss_poll_s)

    # --- lifecycle -------------------------------------------------------------------------------------

    async def start(self, views: Sequence[str] = ()) -> None:
        """Subscribe to other replicas' writes, then build the views' bloom filters from the durable tier.

        Returns after one pass over the views; views the durable tier could not list are retried in the
        background (their filters stay untrusted, so reads still go to the tiers meanwhile)."""
        self._views = list(dict.fromkeys(views))
        if self.misses is not None:
            self.misses.start()
        if self.blooms is not None and self.bloom_refresh_s is not None and self._refresh is None:
            self._refresh = asyncio.create_task(self._refresh_blooms(self.bloom_refresh_s), name="bloom refresh")
        if self.invalidator is not None:
            self.invalidator.attach(self._remote_write, self._invalidation_lost, self._invalidation_back)
            # Once subscribed, _invalidation_back starts the rebuild; until then no filter could be trusted.
            if not await self.invalidator.start():
                log.warning("not subscribed to invalidations yet: bloom filters wait for the subscription")
                return
        else:
            self._invalidation_back()
        await self._first_pass.wait()

    async def rebuild_blooms(self, views: Sequence[str]) -> None:
        """Rebuild the views' filters from every key the durable tier holds; trusted only while subscribed."""
        for view in views:
            if view not in self._views:
                self._views.append(view)
        if self.blooms is None:
            return
        for view in views:
            trust = self.invalidator is None or self.invalidator.subscribed
            count = await self.blooms.rebuild(view, self.durable.keys(view), trust=trust)
            log.info("bloom filter of %s rebuilt from %d keys (trusted: %s)", view, count, self.blooms.trusted(view))

    async def refresh_view(self, view: str) -> None:
        """After another process wrote a view behind this store's back: forget it in memory, rebuild its bloom
        (retried in the background if the durable tier cannot list it now)."""
        if self.blooms is not None:
            self.blooms.mark_untrusted([view])
        self.memory.invalidate_view(view)
        try:
            await self.rebuild_blooms([view])
        except Unavailable as exc:
            log.warning("bloom filter of %s not rebuilt, retrying: %s", view, exc)
            task = asyncio.create_task(self._rebuild_until_done([view]), name=f"bloom rebuild {view}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _refresh_blooms(self, every_s: float) -> None:
        """Rebuild every filter from the durable tier every `every_s`: a key durable in the store is found within
        that (plus one rebuild) even if its write was never announced here (a lost notice, a writer that crashed
        after its durable write, a write whose outcome was unknown)."""
        while True:
            await asyncio.sleep(every_s)
            await self.refresh_blooms()

    async def refresh_blooms(self) -> None:
        """Rebuild every view's filter now (a view the durable tier cannot list keeps its filter)."""
        for view in list(self._views):
            try:
                await self.rebuild_blooms([view])
            except Unavailable as exc:
                log.warning("bloom filter of %s not refreshed: %s", view, exc)

    async def close(self) -> None:
        """Finish the writes under way, stop background work, close the invalidator and every tier."""
        await self.drain()
        if self.misses is not None:
            await self.misses.close()
        tasks = [*self._tasks, *(t for t in (self._rebuild, self._refresh) if t is not None)]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Unavailable):
                await task
        if self.invalidator is not None:
            await self.invalidator.close()
        if self.guard is not None:
            await self.guard.close()
            await self.guard.tier.close()
        await self.durable.close()

    # --- reads -----------------------------------------------------------------------------------------

    async def read(self, keys_by_view: Mapping[str, Sequence[str]]) -> ReadResult:
        """Every key of every view, each from the shallowest tier that has it; never raises for a tier outage."""
        token = self.memory.fill_token()  # before any lower tier is read: see MemoryCache
        result = ReadResult({}, {})
        missing: dict[str, list[int]] = {}
        began = time.perf_counter()
        for view, keys in keys_by_view.items():
            cached = self.memory.get_many(view, keys)
            result.records[view] = [None if value is ABSENT else value for value in cached]
            result.sources[view] = [MEMORY if value is not None else "" for value in cached]
            if idx := [i for i, value in enumerate(cached) if value is None]:
                missing[view] = idx
        misses = _count(missing)
        self._observe(MEMORY, sum(map(len, keys_by_view.values())) - misses, misses, began, result)
        if missing and self.blooms is not None:
            began = time.perf_counter()
            self._skip_absent(self.blooms, keys_by_view, missing, result)
            self._observe(BLOOM, misses - _count(missing), _count(missing), began, result)
        if missing and self.guard is not None:
            began = time.perf_counter()
            try:
                found = await self.guard.read(_wanted(keys_by_view, missing))
            except Unavailable:
                self._failed(self.guard.tier.name, result, began)
            else:
                hits = self._settle(found, self.guard.tier.name, keys_by_view, missing, result, token, keep=True)
                self._observe(self.guard.tier.name, hits, _count(missing), began, result)
        if missing:
            await self._read_durable(keys_by_view, missing, result, token)
        return result

    def _skip_absent(
        self, blooms: BloomFilters, keys: Mapping[str, Sequence[str]], missing: dict[str, list[int]], result: ReadResult
    ) -> None:
        # Keys proved absent are not cached as negative in memory: the bloom answers as fast, and a flood of
        # unknown entities would otherwise push real records out of the LRU.
        for view in list(missing):
            idx = missing[view]
            flags = blooms.might_contain_many(view, [keys[view][i] for i in idx])
            if flags is not None:
                sources = result.sources[view]
                for i, maybe in zip(idx, flags, strict=True):
                    if not maybe:
                        sources[i] = BLOOM
                _set_or_drop(missing, view, [i for i, maybe in zip(idx, flags, strict=True) if maybe])

    async def _read_durable(
        self, keys: Mapping[str, Sequence[str]], missing: dict[str, list[int]], result: ReadResult, token: int
    ) -> None:
        name = self.durable.name
        began = time.perf_counter()
        epoch = self.guard.epoch if self.guard is not None else 0
        try:
            found = await self.durable.read(_wanted(keys, missing))
        except Unavailable as exc:
            log.warning("durable tier unavailable for a read: %s", exc)
            for view, idx in missing.items():
                for i in idx:
                    result.records[view][i] = UNAVAILABLE
                    result.sources[view][i] = UNAVAILABLE.value
            self._failed(name, result, began)
            return
        total = _count(missing)
        hits = self._settle(found, name, keys, missing, result, token, keep=False, epoch=epoch)
        self._observe(name, hits, total - hits, began, result)

    def _settle(
        self,
        found: Mapping[str, Sequence[Record | None]],
        source: str,
        keys: Mapping[str, Sequence[str]],
        missing: dict[str, list[int]],
        result: ReadResult,
        token: int,
        keep: bool,
        epoch: int | None = None,
    ) -> int:
        """Take a tier's answers into the result and fill the tiers above; keep=True leaves misses for the next
        tier, else they are final (remembered as absent). epoch: fill Redis too. The number of hits."""
        hits = 0
        for view, records in found.items():
            fills: list[tuple[str, Record]] = []
            left: list[int] = []
            absent: list[str] = []
            view_keys, sources, out = keys[view], result.sources[view], result.records[view]
            for i, record in zip(missing[view], records, strict=True):
                if record is not None:
                    out[i] = record
                    sources[i] = source
                    fills.append((view_keys[i], record))
                elif keep:
                    left.append(i)
                else:
                    sources[i] = source
                    absent.append(view_keys[i])
            self.memory.put_many(view, fills, since=token)
            self.memory.put_absent(view, absent, since=token)
            if fills and epoch is not None and self.guard is not None and self.guard.usable():
                self._spawn(self.guard.fill(view, fills, epoch))
            hits += len(fills)
            _set_or_drop(missing, view, left)
        return hits

    # --- writes ---------------------------------------------------------------------------------------

    async def write(self, view: str, rows: Sequence[tuple[str, Record]], *, warm: bool = True) -> None:
        """Store rows durably (Unavailable if the durable tier cannot), then update caches, blooms, replicas.

        The work runs in a task of its own that the caller's cancellation or deadline does not stop: a write
        that may have reached the durable tier always finishes its cache work (close() waits for it). warm=False
        (bulk loads) leaves keys whose latest record is not known out of the caches instead of reading them back."""
        if not rows:
            return
        task = asyncio.create_task(self._write(view, rows, warm), name=f"write {view}")
        self._writes.add(task)
        task.add_done_callback(_settled)
        task.add_done_callback(self._writes.discard)
        await asyncio.shield(task)

    async def drain(self) -> None:
        """Wait for every write under way, including those whose callers went away."""
        while self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    async def _write(self, view: str, rows: Sequence[tuple[str, Record]], warm: bool) -> None:
        items = list(latest(rows).items())
        keys = [key for key, _ in items]
        floored: list[int] | None = None
        if self.guard is not None:
            # Floors first: whatever happens from here (a crash, a timeout that applied), Redis serves none of
            # these keys' older records, nor takes them back from a fill.
            floored = await self.guard.floor(view, [(key, record.head()) for key, record in items])
            if floored is None:
                await self._log_miss(view, items)  # before the durable write: no write goes unlogged
        try:
            current = await self.durable.write(view, items)
        except Unavailable:
            # A timeout may have applied the write: this replica's memory and the others' cannot be trusted.
            await self._forget(view, keys)
            raise
        if self.blooms is not None:
            self.blooms.add(view, keys)
        if current is not None:  # the durable tier said what it holds now (SQLite): exact
            self.memory.put_many(view, current.items())
        unsure = [] if current is not None else keys
        if self.guard is not None and floored is not None and current is None:
            held = await self.guard.commit(view, items, floored)
            self.memory.put_many(view, [item for item, ok in zip(items, held, strict=True) if ok])
            unsure = [key for (key, _), ok in zip(items, held, strict=True) if not ok]
        if unsure:
            # The durable tier may hold a later event than this write: read back what it holds, as a read would.
            self.memory.invalidate(view, unsure)
            if warm:
                await self._read_back(view, unsure)
        if self.invalidator is not None:
            await self.invalidator.publish(view, keys)

    async def _read_back(self, view: str, keys: Sequence[str]) -> None:
        """Fill memory and Redis with what the durable tier holds for keys just written, as a read would."""
        token = self.memory.fill_token()
        epoch = self.guard.epoch if self.guard is not None else 0
        try:
            found = (await self.durable.read({view: keys}))[view]
        except Unavailable as exc:
            log.warning("written keys not read back, left out of the caches: %s", exc)
            return
        fills = [(key, record) for key, record in zip(keys, found, strict=True) if record is not None]
        self.memory.put_many(view, fills, since=token)
        if fills and self.guard is not None:
            await self.guard.fill(view, fills, epoch)

    async def _forget(self, view: str, keys: Sequence[str]) -> None:
        """Keys whose write may or may not have applied: out of memory here, announced to the other replicas
        (Redis has their floors already), and in the blooms, since they may exist now."""
        self.memory.invalidate(view, keys)
        if self.blooms is not None:
            self.blooms.add(view, keys)
        if self.invalidator is not None:
            await self.invalidator.publish(view, keys)

    async def _log_miss(self, view: str, items: Sequence[tuple[str, Record]]) -> None:
        """Redis cannot be floored for a write: log it durably for every replica (see redis_misses) before the
        durable write; Unavailable if that fails, so nothing is written that other replicas could miss."""
        if self.misses is None:
            return
        try:
            await self.misses.source.log_redis_misses(view, [(key, r.head()) for key, r in items], time.time())
        except Unavailable as exc:
            raise Unavailable(f"not written: Redis is unreachable and the miss could not be logged: {exc}") from exc

    async def _apply_miss(self, view: str, heads: Sequence[tuple[str, bytes]]) -> None:
        """Another replica (or this one) logged a write Redis missed: see redis_misses."""
        keys = [key for key, _ in heads]
        self.memory.invalidate(view, keys)
        if self.blooms is not None:
            self.blooms.add(view, keys)
        if self.guard is not None:
            await self.guard.floor(view, heads)

    # --- invalidation callbacks ------------------------------------------------------------------------

    def _remote_write(self, view: str, keys: list[str]) -> None:
        self.memory.invalidate(view, keys)
        if self.blooms is not None:
            self.blooms.add(view, keys)

    def _invalidation_lost(self) -> None:
        # Writes may be missed from now on: no bloom can prove absence, no memory entry can be trusted.
        if self.blooms is not None:
            self.blooms.mark_untrusted()
        self.memory.clear()

    def _invalidation_back(self) -> None:
        if self._rebuild is not None:
            self._rebuild.cancel()
        self._rebuild = asyncio.create_task(self._rebuild_until_done(), name="bloom rebuild")

    async def _rebuild_until_done(self, views: Sequence[str] | None = None, delay: float = 0.5) -> None:
        pending = list(self._views if views is None else views) if self.blooms is not None else []
        while True:
            failed = []
            for view in pending:
                try:
                    await self.rebuild_blooms([view])
                except Unavailable as exc:
                    log.warning("bloom filter of %s not rebuilt, retrying: %s", view, exc)
                    failed.append(view)
            self._first_pass.set()
            if not failed:
                return
            pending = failed
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    # --- helpers ---------------------------------------------------------------------------------------

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        if len(self._tasks) >= self.max_background:
            work.close()  # fills are best effort: under a flood, skip rather than pile up
            return
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _failed(self, tier: str, result: ReadResult, began: float) -> None:
        result.failed_tiers.append(tier)
        stats = self.stats.setdefault(tier, TierStats())
        stats.calls += 1
        stats.errors += 1
        stats.seconds += time.perf_counter() - began

    def _observe(self, tier: str, hits: int, misses: int, began: float, result: ReadResult) -> None:
        seconds = time.perf_counter() - began
        if hits:
            result.served_tiers.append(tier)
        stats = self.stats.setdefault(tier, TierStats())
        stats.calls += 1
        stats.hits += hits
        stats.misses += misses
        stats.seconds += seconds
        if self.observer is not None:
            self.observer(tier, hits, misses, seconds)


def _settled(task: asyncio.Task[None]) -> None:
    """Retrieve a write's outcome: its caller may have gone away, and the error was answered or logged."""
    if not task.cancelled() and (exc := task.exception()) is not None and not isinstance(exc, Unavailable):
        log.error("write failed", exc_info=exc)


def _count(missing: Mapping[str, Sequence[int]]) -> int:
    return sum(map(len, missing.values()))


def _wanted(keys: Mapping[str, Sequence[str]], missing: Mapping[str, Sequence[int]]) -> dict[str, list[str]]:
    return {view: [keys[view][i] for i in idx] for view, idx in missing.items()}


def _set_or_drop(missing: dict[str, list[int]], view: str, kept: list[int]) -> None:
    if kept:
        missing[view] = kept
    else:
        del missing[view]
