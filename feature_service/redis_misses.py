"""The Redis-outage guard across replicas: a replica that cannot update Redis after a durable write logs the
keys in the durable tier before acknowledging, and every replica follows that log.

Bound: once such a write is acknowledged, no replica serves the value it replaced for longer than one poll
interval (`poll_s`) plus the time of one poll, provided the replica reaches the durable tier and the clocks
of the replicas differ by less than a minute (entries are filed under the writer's minute; the last
`WINDOW_MINUTES` minutes are read). Following an entry means: drop the keys from this replica's memory tier,
add them to its bloom filters, and raise their floors in Redis (see tiers.redis), so older values are
neither served nor filled back from Redis."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol, runtime_checkable

from chassis.errors import Unavailable

log = logging.getLogger(__name__)

WINDOW_MINUTES = 3

Heads = Sequence[tuple[str, bytes]]


@runtime_checkable
class MissLog(Protocol):
    """A durable tier that can log writes Redis missed (CassandraTier)."""

    async def log_redis_misses(self, view: str, heads: Heads, now: float) -> None: ...

    async def redis_misses(self, minutes: Sequence[int]) -> list[tuple[Any, str, list[tuple[str, bytes]]]]: ...


class MissFollower:
    """Polls a MissLog and hands each entry, once, to `apply(view, heads)`."""

    def __init__(
        self,
        source: MissLog,
        apply: Callable[[str, Heads], Coroutine[Any, Any, None]],
        *,
        poll_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self.apply = apply
        self.poll_s = poll_s
        self.clock = clock
        self.polls = 0
        self._seen: dict[Any, int] = {}  # entry id → minute read in, forgotten once out of the window
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Poll in the background until close()."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="redis miss log")

    async def poll(self) -> int:
        """Read the window once and apply new entries; how many were applied (Unavailable if the log cannot
        be read: nothing is marked seen then)."""
        now_minute = int(self.clock() // 60)
        minutes = list(range(now_minute - WINDOW_MINUTES + 1, now_minute + 2))
        entries = await self.source.redis_misses(minutes)
        applied = 0
        for ident, view, heads in entries:
            if ident in self._seen:
                continue
            await self.apply(view, heads)
            self._seen[ident] = now_minute
            applied += 1
        for ident in [i for i, minute in self._seen.items() if minute < now_minute - WINDOW_MINUTES]:
            del self._seen[ident]
        self.polls += 1
        return applied

    async def _run(self) -> None:
        while True:
            try:
                if applied := await self.poll():
                    log.info("applied %d writes other replicas could not send to redis", applied)
            except Unavailable as exc:
                log.warning("redis miss log not read: %s", exc)
            except Exception:  # the follower must outlive any one failure
                log.exception("redis miss log poll failed")
            await asyncio.sleep(self.poll_s)

    async def close(self) -> None:
        """Stop polling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
