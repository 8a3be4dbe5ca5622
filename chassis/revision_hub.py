"""A revisioned configuration watched by gateways: the current revision, a short history to resume from, and what
each connected gateway accepted or rejected. Plain domain object, generic over what is published (the model
manager's route tables, the experiment service's assignment configurations); `chassis.revision_stream` streams it."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Final, Generic, Protocol, TypeVar

HISTORY: Final = 64  # revisions a gateway can resume from with an update instead of a snapshot
_REJECTIONS: Final = 100


class Revisioned(Protocol):
    """Something published under a revision that grows with every change."""

    @property
    def revision(self) -> int:
        """The revision."""
        ...


T = TypeVar("T", bound=Revisioned)


@dataclass
class Watcher:
    """One connected gateway stream: who, which keys (models, ...) it watches, and the revisions it accepted."""

    gateway_id: str
    scope: frozenset[str]  # empty: every key
    accepted_revision: int = 0
    connected_at: float = field(default_factory=time.time)

    def watches(self, key: str) -> bool:
        """Whether the stream carries `key`."""
        return not self.scope or key in self.scope


@dataclass(frozen=True)
class Rejection:
    """A revision a gateway refused, and why."""

    gateway_id: str
    revision: int
    error: str
    scope: frozenset[str]


class RevisionHub(Generic[T]):
    """Publishes revisions to watching gateways and tracks their acknowledgements. Not thread-safe: call it on the
    server's event loop (from a worker thread, via `loop.call_soon_threadsafe`)."""

    # Raised for a revision that does not grow or a seed that comes too late; subclasses name their own.
    error: type[Exception] = ValueError

    def __init__(self, empty: T, history: int = HISTORY) -> None:
        self._current = empty
        self._published = False
        self._history: dict[int, T] = {}
        self._history_size = history
        self._watchers: list[Watcher] = []
        self._rejections: deque[Rejection] = deque(maxlen=_REJECTIONS)
        self._ack_callbacks: list[Callable[[], None]] = []
        self._publish_listeners: list[Callable[[], None]] = []
        self._acked = asyncio.Event()
        self._closed = False

    @property
    def current(self) -> T:
        """What is current (the empty value at revision 0 until the first publish)."""
        return self._current

    @property
    def published(self) -> bool:
        """Whether anything was published yet: before that, gateways keep what they hold."""
        return self._published

    def publish(self, item: T) -> None:
        """Make `item` current and stream it to every watching gateway; its revision must grow."""
        if item.revision <= self._current.revision:
            raise self.error(f"revision: expected more than the current {self._current.revision}, got {item.revision}")
        self._changing(item)
        self._current = item
        self._published = True
        self._history[item.revision] = item
        while len(self._history) > self._history_size:
            del self._history[min(self._history)]
        self._announce()

    def _changing(self, item: T) -> None:
        """Called as `item` is about to become current, the previous one still current: subclasses track changes."""

    def check_seed(self, item: T) -> None:
        """Raise unless `item` may seed the hub: a published revision (≥ 1), before anything was published."""
        if self._published:
            raise self.error(
                f"seed: expected a hub with nothing published yet, it has revision {self._current.revision}"
            )
        if item.revision < 1:
            raise self.error(f"seed.revision: expected a published revision (≥ 1), got {item.revision}")

    def seed(self, item: T) -> None:
        """Serve `item`, the last one an earlier run published, until the next publish: a gateway holding its
        revision resumes from it. Only before the first publish."""
        self.check_seed(item)
        self._current, self._published = item, True
        self._history = {item.revision: item}
        self._announce()

    def at(self, revision: int) -> T | None:
        """What was published at `revision`, if still in the history."""
        return self._history.get(revision)

    @property
    def closed(self) -> bool:
        """Whether `close` was called: the streams end and no new one starts."""
        return self._closed

    def close(self) -> None:
        """End every gateway stream (the service is stopping): they hold no call open through the drain."""
        self._closed = True
        self._announce()

    def on_publish(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener` after every publish; returns a function that stops it."""
        self._publish_listeners.append(listener)
        return lambda: self._publish_listeners.remove(listener)

    def _announce(self) -> None:
        for listener in list(self._publish_listeners):
            listener()

    def connect(self, gateway_id: str, scope: Collection[str]) -> Watcher:
        """Register a gateway stream."""
        watcher = Watcher(gateway_id, frozenset(scope))
        self._watchers.append(watcher)
        return watcher

    def disconnect(self, watcher: Watcher) -> None:
        """Forget a gateway stream that ended."""
        if watcher in self._watchers:
            self._watchers.remove(watcher)
        self._notify()

    def ack(self, watcher: Watcher, revision: int, accepted: bool, error: str = "") -> None:
        """Record a gateway's answer to one revision."""
        if accepted:
            watcher.accepted_revision = max(watcher.accepted_revision, revision)
        else:
            self._rejections.appendleft(Rejection(watcher.gateway_id, revision, error, watcher.scope))
        self._notify()

    def watchers(self) -> list[Watcher]:
        """The connected gateway streams."""
        return list(self._watchers)

    def applied_revision(self, key: str) -> int:
        """The highest revision every connected gateway watching `key` accepted; 0 with none watching."""
        # A gateway that reconnected before its old stream was seen to end counts by its newest stream.
        newest = {w.gateway_id: w for w in self._watchers}
        revisions = [w.accepted_revision for w in newest.values() if w.watches(key)]
        return min(revisions) if revisions else 0

    async def wait_applied(self, key: str, revision: int, timeout: float) -> bool:  # noqa: ASYNC109 (the agreed interface)
        """Wait until every gateway watching `key` accepted `revision` or later; False on timeout."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.applied_revision(key) < revision:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            event = self._acked
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return self.applied_revision(key) >= revision
        return True

    def rejections(self, key: str) -> list[tuple[str, int, str]]:
        """(gateway_id, revision, error) of the revisions refused by gateways watching `key`, newest first."""
        return [(r.gateway_id, r.revision, r.error) for r in self._rejections if not r.scope or key in r.scope]

    def on_ack(self, callback: Callable[[], None]) -> None:
        """Call `callback` after every ack, rejection and disconnect."""
        self._ack_callbacks.append(callback)

    def _notify(self) -> None:
        # A fresh event per change: waiters woken re-check their condition, later ones wait anew.
        event, self._acked = self._acked, asyncio.Event()
        event.set()
        for callback in list(self._ack_callbacks):
            callback()
