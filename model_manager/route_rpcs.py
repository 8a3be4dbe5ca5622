"""WatchRoutes, the route stream to gateways: a mixin of ModelManagerServicer over a `RouteHub`.

A gateway subscribes with the revision it holds; it gets a snapshot, or only an update from that
revision when the hub still has it (a restarted manager is seeded with its last table, so a gateway
holding that revision resumes with an update); then an update per publish, each based on the revision sent
before. Every ack and rejection is recorded in the hub. After a rejected update the gateway holds
its last good table, which the stream no longer knows: it sends a snapshot."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, Final, TypeAlias

from grpc import aio

from chassis.errors import InvalidArgument, Unavailable
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from model_manager import route_codec
from model_manager.route_codec import REVISION_HEADER
from model_manager.route_hub import RouteHub, Watcher
from model_manager.routes import RouteTable

log = logging.getLogger(__name__)
Context: TypeAlias = aio.ServicerContext[Any, Any]
_PUBLISHED: Final = object()
_CLOSED: Final = object()
_KINDS_KEPT: Final = 64  # sent revisions remembered per stream, to tell a rejected update from a snapshot
# A gateway's message (pb.WatchRoutesRequest), _PUBLISHED, or _CLOSED.
_Event: TypeAlias = Any


class _Stream:
    """What one gateway holds as far as the stream knows, and the messages that move it on."""

    def __init__(self, hub: RouteHub, watcher: Watcher, resume_from: int) -> None:
        self.hub = hub
        self.watcher = watcher
        self.resume_from = resume_from
        self.sent: RouteTable | None = None  # the table the gateway holds once it applies what was sent
        self.sent_kind: dict[int, str] = {}  # revision -> "snapshot" | "update", for rejections
        self.opened = False  # whether the opening message went out

    def first(self) -> pb.WatchRoutesResponse | None:
        """The opening message: an update from the resumed revision, or a snapshot; none before a publish."""
        if not self.hub.published:
            return None
        self.opened = True
        base = self.hub.at(self.resume_from) if self.resume_from else None
        return self._update(base) if base is not None else self._snapshot()

    def on_publish(self) -> pb.WatchRoutesResponse | None:
        """The message bringing the gateway to the hub's current table."""
        if not self.opened:  # the stream began before any table (a restarted manager reading its last one back)
            return self.first()
        current = self.hub.table
        if self.sent is current:
            return None
        return self._update(self.sent) if self.sent is not None else self._snapshot()

    def on_ack(self, ack: pb.RouteAck) -> pb.WatchRoutesResponse | None:
        """Record the ack; after a rejected update, the snapshot that resynchronises the gateway."""
        self.hub.ack(self.watcher, ack.revision, ack.accepted, ack.error)
        if ack.accepted:
            return None
        log.warning("gateway %s rejected route revision %d: %s", self.watcher.gateway_id, ack.revision, ack.error)
        kind = self.sent_kind.get(ack.revision)
        if kind == "update":
            return self._snapshot()
        self.sent = None  # a refused snapshot: the next publish sends a snapshot again
        return None

    def _sent(self, table: RouteTable, kind: str) -> None:
        self.sent = table
        self.sent_kind[table.revision] = kind
        while len(self.sent_kind) > _KINDS_KEPT:
            del self.sent_kind[next(iter(self.sent_kind))]

    def _snapshot(self) -> pb.WatchRoutesResponse:
        table = self.hub.table
        self._sent(table, "snapshot")
        message = route_codec.table_message(table, self.watcher.models, self.hub.changed_at())
        return pb.WatchRoutesResponse(snapshot=message)

    def _update(self, base: RouteTable) -> pb.WatchRoutesResponse:
        table = self.hub.table
        self._sent(table, "update")
        message = route_codec.update_message(base, table, self.watcher.models, self.hub.changed_at())
        return pb.WatchRoutesResponse(update=message)


def _subscription(first: pb.WatchRoutesRequest | None) -> pb.RouteSubscription:
    kind = None if first is None else first.WhichOneof("kind")
    if first is None or kind != "subscribe":
        got = "an empty stream" if first is None else f"{kind or 'an empty message'}"
        raise InvalidArgument(f"subscribe: expected the first message to be a subscription, got {got}")
    subscription = first.subscribe
    if not subscription.gateway_id:
        raise InvalidArgument("subscribe.gateway_id: expected the gateway's id, got an empty string")
    if subscription.resume_from_revision < 0:
        raise InvalidArgument(
            f"subscribe.resume_from_revision: expected a revision ≥ 0, got {subscription.resume_from_revision}"
        )
    return subscription


class RouteRpcs:
    """The WatchRoutes RPC, for ModelManagerServicer's bases; `route_hub` is set at wiring."""

    route_hub: RouteHub | None = None

    async def WatchRoutes(
        self, request_iterator: AsyncIterator[pb.WatchRoutesRequest], context: Context
    ) -> AsyncIterator[pb.WatchRoutesResponse]:
        """Stream the route table to one gateway and record its acknowledgements."""
        hub = self.route_hub
        if hub is None:
            raise Unavailable("model manager is starting: the route table is not served yet")
        if hub.closed:
            raise Unavailable("model manager is stopping: watch the routes again from its next start")
        subscription = _subscription(await anext(request_iterator, None))
        # Headers at once, so the gateway knows it is connected even before the first table is published.
        await context.send_initial_metadata(((REVISION_HEADER, str(hub.table.revision)),))
        watcher = hub.connect(subscription.gateway_id, subscription.model_names)
        stream = _Stream(hub, watcher, subscription.resume_from_revision)
        # Acks and publishes meet in one queue, so the stream's state changes one event at a time.
        queue: asyncio.Queue[_Event] = asyncio.Queue()
        stop_listening = hub.on_publish(lambda: queue.put_nowait(_CLOSED if hub.closed else _PUBLISHED))

        async def read() -> None:
            try:
                async for request in request_iterator:
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
            hub.disconnect(watcher)
