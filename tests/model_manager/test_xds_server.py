"""The ADS server over the wire, driven by a hand-written ADS client that ACKs and NACKs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from model_manager.envoy_resources import CLUSTER, CLUSTER_LOAD_ASSIGNMENT, LISTENER, ROUTE_CONFIGURATION
from model_manager.routes import Endpoint, ModelRoute, RouteError, RouteTable, VersionRoute
from model_manager.xds import AdsServer

A = Endpoint.parse("10.0.0.1:8001")
B = Endpoint.parse("10.0.0.2:8001")
C = Endpoint.parse("10.0.0.3:8001")
V1, V2, V3 = "fresco/fraud/v1", "fresco/fraud/v2", "fresco/fraud/v3"
ROUTES = "fresco/fraud"
READ_TIMEOUT_S = 30.0


def fraud(revision: int, *versions: VersionRoute) -> RouteTable:
    return RouteTable(revision, (ModelRoute("fraud", versions, "seed"),))


TABLE_1 = fraud(1, VersionRoute("v1", 90, (A,)), VersionRoute("v2", 10, (B,)))
TABLE_2 = fraud(2, VersionRoute("v1", 80, (A,)), VersionRoute("v2", 10, (B,)), VersionRoute("v3", 10, (C,)))


class AdsClient:
    """One ADS stream, as an xDS client sees it."""

    def __init__(self, channel: grpc.aio.Channel, node: str) -> None:
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        self.node = node
        self.latest: dict[str, discovery_pb2.DiscoveryResponse] = {}

    async def send(
        self,
        type_url: str,
        names: list[str],
        answering: discovery_pb2.DiscoveryResponse | None = None,
        error: str = "",
        version: str | None = None,
    ) -> None:
        made = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names)
        made.node.id = self.node
        if answering is not None:
            made.response_nonce = answering.nonce
            made.version_info = answering.version_info if version is None else version
        if error:
            made.error_detail.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
            made.error_detail.message = error
        await self.call.write(made)

    async def receive(self) -> tuple[str, str, int]:
        """The next response's type, version and resource count; kept in `last` (and the latest of
        each type in `latest`) for answering."""
        self.last = await asyncio.wait_for(self.call.read(), READ_TIMEOUT_S)
        self.latest[self.last.type_url] = self.last
        short = {LISTENER: "LDS", ROUTE_CONFIGURATION: "RDS", CLUSTER: "CDS", CLUSTER_LOAD_ASSIGNMENT: "EDS"}
        return short[self.last.type_url], self.last.version_info, len(self.last.resources)

    async def subscribe_like_envoy(self) -> None:
        """Clusters and listeners by wildcard, endpoints and routes by name, each ACKed."""
        for type_url, names, expected in [
            (CLUSTER, [], ("CDS", "1", 2)),
            (CLUSTER_LOAD_ASSIGNMENT, [V1, V2], ("EDS", "1", 2)),
            (LISTENER, [], ("LDS", "1", 1)),
            (ROUTE_CONFIGURATION, [ROUTES], ("RDS", "1", 1)),
        ]:
            await self.send(type_url, names)
            assert await self.receive() == expected
            await self.send(type_url, names, self.last)


@pytest.fixture
async def ads() -> AsyncIterator[AdsServer]:
    server = AdsServer()
    await server.start()
    server.update(TABLE_1)
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def channel(ads: AdsServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ads.port}") as opened:
        yield opened


async def eventually(condition, what: str) -> None:
    deadline = time.monotonic() + READ_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_a_new_version_reaches_the_client_as_clusters_then_endpoints_then_routes(ads, channel) -> None:
    client = AdsClient(channel, "envoy-1")
    await client.subscribe_like_envoy()
    ads.update(TABLE_2)
    assert await client.receive() == ("CDS", "2", 3)
    cds = client.last
    await client.send(CLUSTER, [], cds)
    # Envoy asks for the new cluster's endpoints; only once it has them do the routes follow.
    await client.send(CLUSTER_LOAD_ASSIGNMENT, [V1, V2, V3], client.latest[CLUSTER_LOAD_ASSIGNMENT])
    assert await client.receive() == ("EDS", "2", 3)
    await client.send(CLUSTER_LOAD_ASSIGNMENT, [V1, V2, V3], client.last)
    assert await client.receive() == ("RDS", "2", 1)
    await client.send(ROUTE_CONFIGURATION, [ROUTES], client.last)
    await eventually(lambda: ads.service.clients()[0].route_revision == 2, "the routes' ACK")
    [status] = ads.service.clients()
    assert status.node_id == "envoy-1"
    assert status.acked == {CLUSTER: "2", CLUSTER_LOAD_ASSIGNMENT: "2", LISTENER: "1", ROUTE_CONFIGURATION: "2"}


async def test_a_nack_keeps_the_routes_and_shows_in_the_status(ads, channel) -> None:
    client = AdsClient(channel, "envoy-2")
    await client.subscribe_like_envoy()
    ads.update(TABLE_2)
    assert await client.receive() == ("CDS", "2", 3)
    await client.send(CLUSTER, [], client.last, error="cluster fresco/fraud/v3: bad", version="1")
    await eventually(lambda: ads.service.nacks(), "the NACK")
    [nack] = ads.service.nacks()
    assert (nack.node_id, nack.kind, nack.rejected_version, nack.kept_version) == ("envoy-2", "CDS", "2", "1")
    assert nack.message == "cluster fresco/fraud/v3: bad"
    [status] = ads.service.clients()
    assert status.rejected == {CLUSTER: nack}
    assert status.route_revision == 1
    # Revision 2's routes were held: the next thing on the stream is revision 3, clusters first.
    ads.update(fraud(3, VersionRoute("v1", 70, (A,)), VersionRoute("v2", 30, (B,))))
    assert await client.receive() == ("CDS", "3", 2)
    await client.send(CLUSTER, [], client.last)
    assert await client.receive() == ("RDS", "3", 1)
    await client.send(ROUTE_CONFIGURATION, [ROUTES], client.last)
    await eventually(lambda: ads.service.clients()[0].route_revision == 3, "the routes' ACK")
    assert ads.service.clients()[0].rejected == {}


async def test_every_client_gets_each_revision_and_leaves_the_status_when_gone(ads, channel) -> None:
    first, second = AdsClient(channel, "a"), AdsClient(channel, "b")
    await first.subscribe_like_envoy()
    await second.subscribe_like_envoy()
    assert sorted(c.node_id for c in ads.service.clients()) == ["a", "b"]
    ads.update(fraud(2, VersionRoute("v1", 50, (A,)), VersionRoute("v2", 50, (B,))))
    for client in (first, second):
        assert await client.receive() == ("RDS", "2", 1)
    first.call.cancel()
    await eventually(lambda: len(ads.service.clients()) == 1, "the cancelled stream to leave")
    assert ads.service.clients()[0].node_id == "b"


async def test_a_revision_that_goes_back_is_refused(ads) -> None:
    ads.update(fraud(5, VersionRoute("v1", 1, (A,))))
    with pytest.raises(RouteError, match="revision: expected at least the published 5, got 4"):
        ads.update(fraud(4, VersionRoute("v1", 1, (A,))))
    assert ads.service.revision == 5


async def test_delta_xds_is_refused_with_a_clear_status(channel) -> None:
    call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).DeltaAggregatedResources()
    await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(call.read(), READ_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "state of the world" in (caught.value.details() or "")


async def test_closing_ends_every_stream_and_refuses_new_ones(ads, channel) -> None:
    client = AdsClient(channel, "envoy-3")
    await client.subscribe_like_envoy()
    ads.service.close()
    # The stream ends cleanly at once (no waiting for the server's grace period): the client reconnects elsewhere.
    assert await asyncio.wait_for(client.call.read(), READ_TIMEOUT_S) is grpc.aio.EOF
    assert await asyncio.wait_for(client.call.code(), READ_TIMEOUT_S) == grpc.StatusCode.OK
    await eventually(lambda: ads.service.clients() == [], "the ended stream to leave")
    late = AdsClient(channel, "envoy-4")
    await late.send(CLUSTER, [])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(late.call.read(), READ_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "stopping" in (caught.value.details() or "")
