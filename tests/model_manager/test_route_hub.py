"""RouteHub and WatchRoutes over a real gRPC stream: snapshot, updates, resume, acks, rejections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from grpc import aio

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as pb_grpc
from model_manager.route_hub import RouteHub
from model_manager.routes import Endpoint, ModelRoute, RouteError, RouteTable, VersionRoute
from tests.model_manager.route_manager import RouteManager

A = Endpoint("10.0.0.1", 8001)
WAIT_S = 30.0  # a generous bound on waits for a stream message on a loaded machine


def table(revision: int, canary: int = 10, models: tuple[str, ...] = ("fraud",)) -> RouteTable:
    routes = tuple(
        ModelRoute(m, (VersionRoute("1", 100 - canary, (A,)), VersionRoute("2", canary, (A,))), "seed") for m in models
    )
    return RouteTable(revision, routes)


class Gateway:
    """One route stream as a gateway drives it: requests pushed, responses read one at a time."""

    def __init__(self, stub: pb_grpc.ModelManagerServiceStub) -> None:
        self.requests: asyncio.Queue[pb.WatchRoutesRequest | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[pb.WatchRoutesRequest]:
            while (request := await self.requests.get()) is not None:
                yield request

        self.call: aio.StreamStreamCall[pb.WatchRoutesRequest, pb.WatchRoutesResponse] = stub.WatchRoutes(
            requests()  # type: ignore[arg-type]
        )  # type: ignore[assignment]

    @classmethod
    def subscribe(
        cls, stub: pb_grpc.ModelManagerServiceStub, gateway_id: str, resume: int = 0, models: tuple[str, ...] = ()
    ) -> Gateway:
        gateway = cls(stub)
        subscription = pb.RouteSubscription(gateway_id=gateway_id, resume_from_revision=resume, model_names=models)
        gateway.requests.put_nowait(pb.WatchRoutesRequest(subscribe=subscription))
        return gateway

    async def next(self) -> pb.WatchRoutesResponse:
        response = await asyncio.wait_for(self.call.read(), WAIT_S)
        assert isinstance(response, pb.WatchRoutesResponse), response
        return response

    def ack(self, revision: int, accepted: bool = True, error: str = "") -> None:
        ack = pb.RouteAck(revision=revision, accepted=accepted, error=error)
        self.requests.put_nowait(pb.WatchRoutesRequest(ack=ack))

    def close(self) -> None:
        self.call.cancel()


@pytest.fixture
async def manager() -> AsyncIterator[RouteManager]:
    running = await RouteManager().start()
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def stub(manager: RouteManager) -> AsyncIterator[pb_grpc.ModelManagerServiceStub]:
    async with aio.insecure_channel(manager.address) as channel:
        yield pb_grpc.ModelManagerServiceStub(channel)


async def test_the_first_message_must_be_a_subscription(stub) -> None:
    gateway = Gateway(stub)
    gateway.ack(1)
    with pytest.raises(aio.AioRpcError) as caught:
        await gateway.next()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "subscribe" in (caught.value.details() or "")


async def test_snapshot_then_updates_each_acknowledged(manager, stub) -> None:
    hub = manager.hub
    hub.publish(table(1))
    gateway = Gateway.subscribe(stub, "gw-a")
    first = await gateway.next()
    assert first.WhichOneof("kind") == "snapshot"
    assert first.snapshot.revision == 1
    assert hub.applied_revision("fraud") == 0  # connected, nothing accepted yet
    gateway.ack(1)
    assert await hub.wait_applied("fraud", 1, WAIT_S)

    hub.publish(table(2, canary=50))
    second = await gateway.next()
    assert second.WhichOneof("kind") == "update"
    assert (second.update.base_revision, second.update.revision) == (1, 2)
    assert [r.model_name for r in second.update.upserted_routes] == ["fraud"]
    assert hub.applied_revision("fraud") == 1
    gateway.ack(2)
    assert await hub.wait_applied("fraud", 2, WAIT_S)
    assert not await hub.wait_applied("fraud", 3, 0.05)  # nobody has 3: a timeout says so
    gateway.close()
    for _ in range(int(WAIT_S / 0.05)):
        if not hub.watchers():
            break
        await asyncio.sleep(0.05)
    assert hub.applied_revision("fraud") == 0  # no gateway watches it any more


async def test_resume_from_a_held_revision_gets_only_an_update(manager, stub) -> None:
    for revision in (1, 2, 3):
        manager.hub.publish(table(revision, canary=revision * 10))
    behind = Gateway.subscribe(stub, "gw-behind", resume=2)
    message = await behind.next()
    assert message.WhichOneof("kind") == "update"
    assert (message.update.base_revision, message.update.revision) == (2, 3)
    current = Gateway.subscribe(stub, "gw-current", resume=3)
    message = await current.next()
    assert (message.update.base_revision, message.update.revision) == (3, 3)
    assert list(message.update.upserted_routes) == []
    unknown = Gateway.subscribe(stub, "gw-unknown", resume=99)
    assert (await unknown.next()).snapshot.revision == 3
    for gateway in (behind, current, unknown):
        gateway.close()


async def test_a_rejected_update_is_recorded_and_answered_with_a_snapshot(manager, stub) -> None:
    hub = manager.hub
    hub.publish(table(1, models=("fraud", "churn")))
    gateway = Gateway.subscribe(stub, "gw-r", models=("fraud",))
    snapshot = (await gateway.next()).snapshot
    assert [r.model_name for r in snapshot.routes] == ["fraud"]  # only what it watches
    gateway.ack(1)
    hub.publish(table(2, canary=30, models=("fraud", "churn")))
    assert (await gateway.next()).update.revision == 2
    gateway.ack(2, accepted=False, error="routes[fraud]: no")
    resync = await gateway.next()
    assert resync.WhichOneof("kind") == "snapshot"
    assert resync.snapshot.revision == 2
    assert hub.rejections("fraud") == [("gw-r", 2, "routes[fraud]: no")]
    assert hub.rejections("churn") == []
    assert hub.applied_revision("fraud") == 1
    assert hub.applied_revision("churn") == 0  # watched by no gateway
    gateway.close()


async def test_nothing_is_sent_before_the_first_publish() -> None:
    async with await_manager() as (manager, stub):
        gateway = Gateway.subscribe(stub, "gw-early", resume=7)
        for _ in range(int(WAIT_S / 0.02)):
            if manager.hub.watchers():
                break
            await asyncio.sleep(0.02)
        # The stream opened with an empty hub: the gateway is sent nothing and keeps the table it has.
        assert [w.gateway_id for w in manager.hub.watchers()] == ["gw-early"]
        assert manager.servicer.sent == []
        manager.hub.publish(table(8))
        assert (await gateway.next()).snapshot.revision == 8
        gateway.close()


class await_manager:  # noqa: N801 (an async context manager used like a function)
    """A manager and a stub to it, stopped on exit."""

    async def __aenter__(self) -> tuple[RouteManager, pb_grpc.ModelManagerServiceStub]:
        self.manager = await RouteManager().start()
        self.channel = aio.insecure_channel(self.manager.address)
        return self.manager, pb_grpc.ModelManagerServiceStub(self.channel)

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()
        await self.manager.stop()


async def test_a_hub_seeded_with_the_last_table_resumes_gateways_from_its_revision(manager, stub) -> None:
    hub = manager.hub
    early = Gateway.subscribe(stub, "gw-early", resume=5)  # reconnected before the manager read its table back
    await until(lambda: [w.gateway_id for w in hub.watchers()] == ["gw-early"], "the early stream")
    hub.seed(table(5, canary=50), {"fraud": 4})
    message = await early.next()
    assert message.WhichOneof("kind") == "update", message
    assert (message.update.base_revision, message.update.revision) == (5, 5)
    assert list(message.update.upserted_routes) == []
    early.ack(5)
    assert await hub.wait_applied("fraud", 5, WAIT_S)

    held = Gateway.subscribe(stub, "gw-held", resume=5)
    assert (await held.next()).update.base_revision == 5
    unknown = Gateway.subscribe(stub, "gw-unknown", resume=3)  # a revision the restarted hub never had
    snapshot = await unknown.next()
    assert snapshot.WhichOneof("kind") == "snapshot"
    assert snapshot.snapshot.revision == 5
    assert snapshot.snapshot.routes[0].revision == 4  # when the route last changed, as kept

    hub.publish(table(6, canary=60))
    for gateway in (early, held):
        message = await gateway.next()
        assert message.WhichOneof("kind") == "update", message
        assert (message.update.base_revision, message.update.revision) == (5, 6)
    assert (await unknown.next()).update.base_revision == 5
    for gateway in (early, held, unknown):
        gateway.close()


def test_only_a_hub_with_nothing_published_is_seeded() -> None:
    hub = RouteHub()
    with pytest.raises(RouteError, match=r"seed\.revision"):
        hub.seed(RouteTable(0), {})
    hub.seed(table(3), {})
    assert (hub.published, hub.table.revision, hub.at(3)) == (True, 3, table(3))
    with pytest.raises(RouteError, match="nothing published yet"):
        hub.seed(table(4), {})
    hub.publish(table(4, canary=40))
    assert hub.changed_at() == {"fraud": 4}


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(int(WAIT_S / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_revisions_only_grow() -> None:
    hub = RouteHub()
    hub.publish(table(5))
    with pytest.raises(RouteError, match="expected more than the current 5"):
        hub.publish(table(5))
    assert hub.table.revision == 5


def test_a_reconnected_gateway_counts_by_its_newest_stream() -> None:
    hub = RouteHub()
    hub.publish(table(1))
    hub.publish(table(2))
    old = hub.connect("gw-a", ())
    hub.ack(old, 1, accepted=True)
    new = hub.connect("gw-a", ())  # the old stream is not seen to have ended yet
    hub.ack(new, 2, accepted=True)
    assert hub.applied_revision("fraud") == 2
    other = hub.connect("gw-b", ("fraud",))
    assert hub.applied_revision("fraud") == 0  # gw-b has accepted nothing yet
    hub.ack(other, 2, accepted=True)
    assert hub.applied_revision("fraud") == 2
    hub.disconnect(new)
    assert hub.applied_revision("fraud") == 1  # gw-a's remaining stream holds revision 1


async def test_a_subscription_needs_a_gateway_id(stub) -> None:
    gateway = Gateway.subscribe(stub, "")
    with pytest.raises(aio.AioRpcError) as caught:
        await gateway.next()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "subscribe.gateway_id" in (caught.value.details() or "")
