"""WatchRoutes, the route stream to gateways: a mixin of ModelManagerServicer over a `RouteHub`, streamed by
`chassis.revision_stream` (snapshot or resumed update, then an update per publish, acks recorded, a snapshot
after a rejected update)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

from grpc import aio

from chassis import revision_stream
from chassis.errors import Unavailable
from chassis.revision_stream import RevisionStream
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from model_manager import route_codec
from model_manager.route_codec import REVISION_HEADER
from model_manager.route_hub import RouteHub, Watcher
from model_manager.routes import RouteTable

Context: TypeAlias = aio.ServicerContext[Any, Any]


def route_stream(
    hub: RouteHub, watcher: Watcher, resume_from: int
) -> RevisionStream[RouteTable, pb.WatchRoutesResponse]:
    """One gateway's route stream: tables restricted to the models it watches."""

    def snapshot(table: RouteTable) -> pb.WatchRoutesResponse:
        message = route_codec.table_message(table, watcher.scope, hub.changed_at())
        return pb.WatchRoutesResponse(snapshot=message)

    def update(base: RouteTable, table: RouteTable) -> pb.WatchRoutesResponse:
        message = route_codec.update_message(base, table, watcher.scope, hub.changed_at())
        return pb.WatchRoutesResponse(update=message)

    return RevisionStream(hub, watcher, resume_from, snapshot, update, what="route")


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
        subscription: pb.RouteSubscription = revision_stream.subscription(await anext(request_iterator, None))
        # Headers at once, so the gateway knows it is connected even before the first table is published.
        await context.send_initial_metadata(((REVISION_HEADER, str(hub.table.revision)),))
        watcher = hub.connect(subscription.gateway_id, subscription.model_names)
        stream = route_stream(hub, watcher, subscription.resume_from_revision)
        async for response in revision_stream.serve(stream, request_iterator):
            yield response
