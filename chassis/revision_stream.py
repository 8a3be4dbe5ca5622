"""One gateway's watch stream over a `RevisionHub`: a snapshot, or only an update from the revision it resumes
from when the hub still has it (a restarted service is seeded with its last revision, so a gateway holding it
resumes with an update); then an update per publish, each based on the revision sent before. Every ack and
rejection is recorded in the hub. After a rejected update the gateway holds its last good revision, which the
stream no longer knows: it sends a snapshot. Generic over what is published and the messages that carry it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Final, Generic, Protocol, TypeAlias, TypeVar

from chassis.errors import InvalidArgument
from chassis.revision_hub import Revisioned, RevisionHub, Watcher

log = logging.getLogger(__name__)
_PUBLISHED: Final = object()
_CLOSED: Final = object()
_KINDS_KEPT: Final = 64  # sent revisions remembered per stream, to tell a rejected update from a snapshot

T = TypeVar("T", bound=Revisioned)
M = TypeVar("M")


class Ack(Protocol):
    """A gateway's answer to one revision (RouteAck, ConfigAck)."""

    @property
    def revision(self) -> int: ...
    @property
    def accepted(self) -> bool: ...
    @property
    def error(self) -> str: ...


class RevisionStream(Generic[T, M]):
    """What one gateway holds as far as the stream knows, and the messages that move it on: `snapshot(item)` and
    `update(base, item)` build the outgoing messages."""

    def __init__(
        self,
        hub: RevisionHub[T],
        watcher: Watcher,
        resume_from: int,
        snapshot: Callable[[T], M],
        update: Callable[[T, T], M],
        what: str = "configuration",
    ) -> None:
        self.hub = hub
        self.watcher = watcher
        self.resume_from = resume_from
        self._snapshot_of = snapshot
        self._update_of = update
        self.what = what
        self.sent: T | None = None  # what the gateway holds once it applies what was sent
        self.sent_kind: dict[int, str] = {}  # revision -> "snapshot" | "update", for rejections
        self.opened = False  # whether the opening message went out

    def first(self) -> M | None:
        """The opening message: an update from the resumed revision, or a snapshot; none before a publish."""
        if not self.hub.published:
            return None
        self.opened = True
        base = self.hub.at(self.resume_from) if self.resume_from else None
        return self._update(base) if base is not None else self._snapshot()

    def on_publish(self) -> M | None:
        """The message bringing the gateway to the hub's current revision."""
        if not self.opened:  # the stream began before any publish (a restarted service reading its last one back)
            return self.first()
        if self.sent is self.hub.current:
            return None
        return self._update(self.sent) if self.sent is not None else self._snapshot()

    def on_ack(self, ack: Ack) -> M | None:
        """Record the ack; after a rejected update, the snapshot that resynchronises the gateway."""
        self.hub.ack(self.watcher, ack.revision, ack.accepted, ack.error)
        if ack.accepted:
            return None
        log.warning(
            "gateway %s rejected %s revision %d: %s", self.watcher.gateway_id, self.what, ack.revision, ack.error
        )
        kind = self.sent_kind.get(ack.revision)
        if kind == "update":
            return self._snapshot()
        self.sent = None  # a refused snapshot: the next publish sends a snapshot again
        return None

    def _sent(self, item: T, kind: str) -> None:
        self.sent = item
        self.sent_kind[item.revision] = kind
        while len(self.sent_kind) > _KINDS_KEPT:
            del self.sent_kind[next(iter(self.sent_kind))]

    def _snapshot(self) -> M:
        item = self.hub.current
        self._sent(item, "snapshot")
        return self._snapshot_of(item)

    def _update(self, base: T) -> M:
        item = self.hub.current
        self._sent(item, "update")
        return self._update_of(base, item)


# A gateway's request message (with a `kind` oneof of subscribe | ack), _PUBLISHED, or _CLOSED.
_Event: TypeAlias = Any


async def serve(stream: RevisionStream[T, M], requests: AsyncIterator[Any]) -> AsyncIterator[M]:
    """Drive `stream` from the gateway's requests (after its subscription: acks only) and the hub's publishes,
    yielding the messages to send, until the gateway hangs up or the hub closes."""
    hub = stream.hub
    # Acks and publishes meet in one queue, so the stream's state changes one event at a time.
    queue: asyncio.Queue[_Event] = asyncio.Queue()
    stop_listening = hub.on_publish(lambda: queue.put_nowait(_CLOSED if hub.closed else _PUBLISHED))

    async def read() -> None:
        try:
            async for request in requests:
                queue.put_nowait(request)
        finally:
            queue.put_nowait(_CLOSED)

    reader = asyncio.create_task(read())
    try:
        if (opening := stream.first()) is not None:
            yield opening
        while (event := await queue.get()) is not _CLOSED:
            if event is _PUBLISHED:
                response = stream.on_publish()
            elif (kind := event.WhichOneof("kind")) == "ack":
                response = stream.on_ack(event.ack)
            else:
                got = "another subscription" if kind else "an empty message"
                raise InvalidArgument(f"kind: expected an ack after the subscription, got {got}")
            if response is not None:
                yield response
    finally:
        stop_listening()
        reader.cancel()
        hub.disconnect(stream.watcher)


def subscription(first: Any | None) -> Any:
    """The subscription a watch stream opens with (a message with `gateway_id` and `resume_from_revision`);
    INVALID_ARGUMENT when the first request is not one, or names no gateway."""
    kind = None if first is None else first.WhichOneof("kind")
    if first is None or kind != "subscribe":
        got = "an empty stream" if first is None else f"{kind or 'an empty message'}"
        raise InvalidArgument(f"subscribe: expected the first message to be a subscription, got {got}")
    subscribe = first.subscribe
    if not subscribe.gateway_id:
        raise InvalidArgument("subscribe.gateway_id: expected the gateway's id, got an empty string")
    if subscribe.resume_from_revision < 0:
        raise InvalidArgument(
            f"subscribe.resume_from_revision: expected a revision ≥ 0, got {subscribe.resume_from_revision}"
        )
    return subscribe
