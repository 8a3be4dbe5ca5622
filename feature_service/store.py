"""The tiered read and write path: memory (L1) → bloom filters → Redis (L2) → the durable tier (L3).

Reads answer whatever they can: a failed tier makes the answer degraded, and keys no tier could answer
are marked UNAVAILABLE rather than failing the whole read. Writes are acknowledged only once durable;
the caches after that are best effort, and Redis is never trusted again after missing a write until the
keys it may hold stale are deleted."""

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
from feature_service.records import DurableTier, Record
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
    ) -> None:
        self.memory, self.durable = memory, durable
        self.blooms = blooms
        self.invalidator = invalidator
        self.observer = observer
        self.stats: dict[str, TierStats] = {}
        self.max_background = max_background
        self._views: list[str] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rebuild: asyncio.Task[None] | None = None
        self._first_pass = asyncio.Event()  # set once a rebuild went over every view (or could not start)
        self.guard = None if cache is None else CacheGuard(cache, retry_s=cache_retry_s, max_dirty_keys=max_dirty_keys)

    # --- lifecycle -------------------------------------------------------------------------------------

    async def start(self, views: Sequence[str] = ()) -> None:
        """Subscribe to other replicas' writes, then build the views' bloom filters from the durable tier.

        Returns after one pass over the views; views the durable tier could not list are retried in the
        background (their filters stay untrusted, so reads still go to the tiers meanwhile)."""
        self._views = list(dict.fromkeys(views))
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

    async def close(self) -> None:
        """Stop background work and close the invalidator and every tier."""
        tasks = [*self._tasks, *([self._rebuild] if self._rebuild is not None else [])]
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

    # --- writes ----------------------------------------------------------------------------------------

    async def write(self, view: str, rows: Sequence[tuple[str, Record]]) -> None:
        """Store rows durably (Unavailable if the durable tier cannot), then update caches, blooms, replicas."""
        if not rows:
            return
        await self.durable.write(view, rows)
        keys = [key for key, _ in rows]
        self.memory.put_many(view, rows)
        if self.blooms is not None:
            self.blooms.add(view, keys)
        if self.guard is not None:
            await self.guard.write(view, rows)
        if self.invalidator is not None:
            await self.invalidator.publish(view, keys)

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


def _count(missing: Mapping[str, Sequence[int]]) -> int:
    return sum(map(len, missing.values()))


def _wanted(keys: Mapping[str, Sequence[str]], missing: Mapping[str, Sequence[int]]) -> dict[str, list[str]]:
    return {view: [keys[view][i] for i in idx] for view, idx in missing.items()}


def _set_or_drop(missing: dict[str, list[int]], view: str, kept: list[int]) -> None:
    if kept:
        missing[view] = kept
    else:
        del missing[view]
