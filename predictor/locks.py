"""Per-name locks that exist only while someone holds or waits for them, so that calls naming
made-up models leave nothing behind."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


@dataclass
class _Entry:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # holders and waiters


class NamedLocks:
    """One asyncio lock per name, created on first use and dropped when its last user leaves."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    async def acquire(self, name: str) -> None:
        """Wait for the lock of `name`; pair with `release(name)`."""
        entry = self._entries.setdefault(name, _Entry())
        entry.users += 1
        try:
            await entry.lock.acquire()
        except BaseException:
            self._leave(name, entry)
            raise

    def release(self, name: str) -> None:
        """Release the lock of `name`, forgetting it when nobody else waits."""
        entry = self._entries[name]
        entry.lock.release()
        self._leave(name, entry)

    def _leave(self, name: str, entry: _Entry) -> None:
        entry.users -= 1
        if entry.users == 0:
            del self._entries[name]

    @asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        """`acquire()` and `release()` around a block."""
        await self.acquire(name)
        try:
            yield
        finally:
            self.release(name)
