"""The route table the gateways watch: the current revision, a short history to resume from, and
what each connected gateway accepted or rejected. Plain domain object; `route_rpcs` streams it."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Final

from model_manager.routes import RouteError, RouteTable

_HISTORY: Final = 64  # revisions a gateway can resume from with an update instead of a snapshot
_REJECTIONS: Final = 100


def changes(before: RouteTable, after: RouteTable, changed_at: Mapping[str, int]) -> dict[str, int]:
    """For each model, the revision its route last changed at once `after` follows `before`."""
    old = {r.model: r for r in before.routes}
    out = dict(changed_at)
    for route in after.routes:
        if old.get(route.model) != route:
            out[route.model] = after.revision
    return out


@dataclass
class Watcher:
    """One connected gateway stream: who, which models, and the revisions it accepted."""

    gateway_id: str
    models: frozenset[str]  # empty: every model
    accepted_revision: int = 0
    connected_at: float = field(default_factory=time.time)

    def watches(self, model: str) -> bool:
        """Whether the stream carries `model`'s route."""
        return not self.models or model in self.models


@dataclass(frozen=True)
class Rejection:
    """A revision a gateway refused, and why."""

    gateway_id: str
    revision: int
    error: str
    models: frozenset[str]


class RouteHub:
    """Publishes route tables to watching gateways and tracks their acknowledgements. Not thread-safe:
    call it on the server's event loop (from a worker thread, via `loop.call_soon_threadsafe`)."""

    def __init__(self, history: int = _HISTORY) -> None:
        self._table = RouteTable(0)
        self._published = False
        self._history: dict[int, RouteTable] = {}
        self._history_size = history
        self._changed_at: dict[str, int] = {}
        self._watchers: list[Watcher] = []
        self._rejections: deque[Rejection] = deque(maxlen=_REJECTIONS)
        self._ack_callbacks: list[Callable[[], None]] = []
        self._publish_listeners: list[Callable[[], None]] = []
        self._acked = asyncio.Event()
        self._closed = False

    @property
    def table(self) -> RouteTable:
        """The current table (revision 0 and empty until the first publish)."""
        return self._table

    @property
    def published(self) -> bool:
        """Whether any table was published yet: before that, gateways keep what they hold."""
        return self._published

    def publish(self, table: RouteTable) -> None:
        """Make `table` current and stream it to every watching gateway; its revision must grow."""
        if table.revision <= self._table.revision:
            raise RouteError(f"revision: expected more than the current {self._table.revision}, got {table.revision}")
        self._changed_at = changes(self._table, table, self._changed_at)
        self._table = table
        self._published = True
        self._history[table.revision] = table
        while len(self._history) > self._history_size:
            del self._history[min(self._history)]
        for listener in list(self._publish_listeners):
            listener()

    def seed(self, table: RouteTable, changed_at: Mapping[str, int]) -> None:
        """Serve `table`, the last one an earlier run published, until the next publish: a gateway holding its
        revision resumes from it. Only before the first publish."""
        if self._published:
            raise RouteError(f"seed: expected a hub with nothing published yet, it has revision {self._table.revision}")
        if table.revision < 1:
            raise RouteError(f"seed.revision: expected a published revision (≥ 1), got {table.revision}")
        self._table, self._published = table, True
        self._history = {table.revision: table}
        self._changed_at = dict(changed_at)
        for listener in list(self._publish_listeners):
            listener()

    def at(self, revision: int) -> RouteTable | None:
        """The table published at `revision`, if still in the history."""
        return self._history.get(revision)

    def changed_at(self) -> dict[str, int]:
        """For each model, the revision its route last changed at."""
        return dict(self._changed_at)

    @property
    def closed(self) -> bool:
        """Whether `close` was called: the streams end and no new one starts."""
        return self._closed

    def close(self) -> None:
        """End every gateway stream (the manager is stopping): they hold no call open through the drain."""
        self._closed = True
        for listener in list(self._publish_listeners):
            listener()

    def on_publish(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener` after every publish; returns a function that stops it."""
        self._publish_listeners.append(listener)
        return lambda: self._publish_listeners.remove(listener)

    def connect(self, gateway_id: str, models: Collection[str]) -> Watcher:
        """Register a gateway stream."""
        watcher = Watcher(gateway_id, frozenset(models))
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
            self._rejections.appendleft(Rejection(watcher.gateway_id, revision, error, watcher.models))
        self._notify()

    def watchers(self) -> list[Watcher]:
        """The connected gateway streams."""
        return list(self._watchers)

    def applied_revision(self, model: str) -> int:
        """The highest revision every connected gateway watching `model` accepted; 0 with none watching."""
        # A gateway that reconnected before its old stream was seen to end counts by its newest stream.
        newest = {w.gateway_id: w for w in self._watchers}
        revisions = [w.accepted_revision for w in newest.values() if w.watches(model)]
        return min(revisions) if revisions else 0

    async def wait_applied(self, model: str, revision: int, timeout: float) -> bool:  # noqa: ASYNC109 (the agreed interface)
        """Wait until every gateway watching `model` accepted `revision` or later; False on timeout."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.applied_revision(model) < revision:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            event = self._acked
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return self.applied_revision(model) >= revision
        return True

    def rejections(self, model: str) -> list[tuple[str, int, str]]:
        """(gateway_id, revision, error) of the revisions refused by gateways watching `model`, newest first."""
        return [(r.gateway_id, r.revision, r.error) for r in self._rejections if not r.models or model in r.models]

    def on_ack(self, callback: Callable[[], None]) -> None:
        """Call `callback` after every ack, rejection and disconnect."""
        self._ack_callbacks.append(callback)

    def _notify(self) -> None:
        # A fresh event per change: waiters woken re-check their condition, later ones wait anew.
        event, self._acked = self._acked, asyncio.Event()
        event.set()
        for callback in list(self._ack_callbacks):
            callback()
