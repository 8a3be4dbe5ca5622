"""The ADS server (`envoy.service.discovery.v3.AggregatedDiscoveryService`, state of the world) that
publishes the route table to Envoy and to gRPC's proxyless xDS clients. `AdsService` can be mounted
on any grpc.aio server; `AdsServer` runs it alone on a port."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Final, TypeAlias

import grpc
from envoy.service.discovery.v3 import ads_pb2, ads_pb2_grpc, discovery_pb2

from chassis.auth import Role, method_roles
from model_manager.envoy_resources import XdsSnapshot, snapshot
from model_manager.routes import RouteError, RouteTable
from model_manager.xds_stream import AdsStream, ClientStatus, Nack

log = logging.getLogger(__name__)
_NACK_HISTORY: Final = 100

# A request from the client, a new revision to publish, or None when the client has gone.
# A client's DiscoveryRequest (discovery_pb2 has no type stubs), _PUBLISHED, or None when the client has gone.
_Event: TypeAlias = Any
_PUBLISHED: Final = object()  # a new revision is published: the stream takes the latest

# Envoy and proxyless clients read the route table, as gateways do over WatchRoutes: a read, open
# without a token (viewer with --auth-require-for-reads) rather than an unlisted method's admin.
METHOD_ROLES: Final[dict[str, Role | None]] = method_roles(
    ads_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"],
    writes={},
    reads=["StreamAggregatedResources", "DeltaAggregatedResources"],
)


class AdsService:
    """Publishes each new route table revision to every connected ADS stream, and keeps what the
    clients accepted and rejected for status."""

    def __init__(self, nack_history: int = _NACK_HISTORY) -> None:
        self._snapshot: XdsSnapshot | None = None
        self._streams: dict[AdsStream, asyncio.Queue[_Event]] = {}
        self._nacks: deque[Nack] = deque(maxlen=nack_history)
        self._closed = False

    @property
    def revision(self) -> int | None:
        """The revision being published, None before the first table."""
        return self._snapshot.revision if self._snapshot is not None else None

    def update(self, table: RouteTable) -> None:
        """Publish a route table; call it on the server's event loop."""
        self.publish(snapshot(table))

    def publish(self, resources: XdsSnapshot) -> None:
        """Publish prebuilt resources; revisions never go back."""
        if self._snapshot is not None and resources.revision < self._snapshot.revision:
            published = self._snapshot.revision
            raise RouteError(f"revision: expected at least the published {published}, got {resources.revision}")
        self._snapshot = resources
        for queue in self._streams.values():
            queue.put_nowait(_PUBLISHED)

    @property
    def closed(self) -> bool:
        """Whether `close` was called: the streams end and no new one starts."""
        return self._closed

    def close(self) -> None:
        """End every ADS stream (the server is stopping): they never end by themselves, and would hold the drain for
        its whole grace period. Clients reconnect, to this server's next start or another."""
        self._closed = True
        if self._streams:
            log.info("ending %d xDS streams: the server is stopping", len(self._streams))
        for queue in self._streams.values():
            queue.put_nowait(None)

    def clients(self) -> list[ClientStatus]:
        """Each connected client's accepted versions and current rejections."""
        return [stream.status() for stream in self._streams]

    def nacks(self) -> list[Nack]:
        """The latest NACKs from any client, oldest first."""
        return list(self._nacks)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Mount the service on a grpc.aio server."""
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, server)

    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        """One client's ADS stream: its requests and new revisions in, responses out, in order."""
        if self._closed:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the xDS server is stopping: connect again later")
        stream = AdsStream(self._snapshot, on_nack=self._nacks.append)
        # Requests and new revisions meet in one queue, so the stream's state changes one event at a
        # time; revisions published while the stream is busy are taken together, as the latest.
        queue: asyncio.Queue[_Event] = asyncio.Queue()
        self._streams[stream] = queue

        async def read() -> None:
            try:
                async for request in request_iterator:
                    queue.put_nowait(request)
            finally:
                queue.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (event := await queue.get()) is not None:
                if event is _PUBLISHED:
                    if self._snapshot is None or stream.snapshot is self._snapshot:
                        continue
                    responses = stream.on_snapshot(self._snapshot)
                else:
                    responses = stream.on_request(event)
                for response in responses:
                    yield response
        finally:
            del self._streams[stream]
            reader.cancel()

    async def DeltaAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[discovery_pb2.DeltaDiscoveryResponse]:
        """Incremental xDS is not served: clients use the state-of-the-world stream."""
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, "delta xDS is not served: use StreamAggregatedResources (state of the world)"
        )
        yield discovery_pb2.DeltaDiscoveryResponse()  # unreachable: abort raises; makes this a generator


class AdsServer:
    """The ADS service alone on a grpc.aio server, for running it outside the model manager."""

    def __init__(self, service: AdsService | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.service = service or AdsService()
        self._address = f"{host}:{port}"
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        """Bind and start serving; the bound port."""
        server = grpc.aio.server()
        self.service.add_to_server(server)
        self.port = server.add_insecure_port(self._address)
        await server.start()
        self._server = server
        return self.port

    async def stop(self, grace_s: float = 1.0) -> None:
        """Stop serving: the streams end at once, other calls within the grace period."""
        if self._server is not None:
            self.service.close()
            await self._server.stop(grace_s)
            self._server = None

    def update(self, table: RouteTable) -> None:
        """Publish a route table to every client."""
        self.service.update(table)
