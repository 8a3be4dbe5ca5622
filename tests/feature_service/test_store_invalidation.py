"""Two replicas of the tiered store sharing Redis and Cassandra: a write on one reaches the other's memory
and bloom filter through the invalidation channel."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from feature_service.invalidation import Invalidator
from feature_service.records import Record, entity_key
from feature_service.store import BLOOM, MEMORY
from fresco.servers import RedisServer
from tests.feature_service import wait_for

pytestmark = pytest.mark.integration


async def test_a_write_on_one_replica_reaches_the_other(make_store, view: str) -> None:
    a = await make_store([view])
    b = await make_store([view])
    key = entity_key(["new user"])
    assert (await a.read({view: [key]})).sources[view] == [BLOOM]  # never written: proved absent

    v1 = Record({"x": 1}, 1.0, 1.0)
    await b.write(view, [(key, v1)])
    assert a.blooms is not None
    await wait_for(lambda: a.blooms.might_contain_many(view, [key]) == [True], 2.0, "a's bloom learning the key")
    first = await a.read({view: [key]})
    assert (first.records[view], first.sources[view]) == ([v1], ["redis"])
    assert a.memory.get_many(view, [key]) == [v1]

    v2 = Record({"x": 2}, 2.0, 2.0)
    await b.write(view, [(key, v2)])
    await wait_for(lambda: a.memory.get_many(view, [key]) == [None], 2.0, "a's memory dropping the key")
    assert (await a.read({view: [key]})).records[view] == [v2]


async def test_a_replica_ignores_its_own_announcements(make_store, view: str) -> None:
    a = await make_store([view])
    b = await make_store([view])
    assert a.invalidator is not None
    assert b.invalidator is not None
    record = Record({"x": 1}, 1.0, 1.0)
    await a.write(view, [(entity_key([1]), record)])
    await wait_for(lambda: b.invalidator.received == 1, 2.0, "b receiving a's write")
    assert a.invalidator.received == 0
    # a's own memory keeps what it wrote.
    assert (await a.read({view: [entity_key([1])]})).sources[view] == [MEMORY]


class Proxy:
    """A TCP proxy in front of Redis that can cut one client off while others stay connected (a partition)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.open = True
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    def cut(self) -> None:
        self.open = False
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class Events:
    """What an invalidator reported to its store."""

    def __init__(self) -> None:
        self.keys: list[tuple[str, list[str]]] = []
        self.lost = 0
        self.subscribed = 0

    def attach(self, invalidator: Invalidator) -> None:
        def on_lost() -> None:
            self.lost += 1

        def on_subscribed() -> None:
            self.subscribed += 1

        invalidator.attach(lambda view, keys: self.keys.append((view, keys)), on_lost, on_subscribed)


@pytest.fixture
async def partition(redis_server: RedisServer, prefix: str):
    """Invalidator a behind a proxy that can be cut, invalidator b connected directly, and b's events."""
    proxy = await Proxy(redis_server.port).start()
    options = {"channel": prefix + "writes", "heartbeat_s": 0.2, "backoff_s": (0.05, 0.2), "max_pending_keys": 5}
    a = Invalidator(f"redis://127.0.0.1:{proxy.port}/0", origin="a", **options)
    b = Invalidator(redis_server.url, origin="b", **options)
    events = Events()
    events.attach(b)
    assert await a.start()
    assert await b.start()
    yield proxy, a, b, events
    await a.close()
    await b.close()
    await proxy.close()


async def test_announcements_wait_out_a_partition(partition) -> None:
    proxy, a, b, events = partition
    await a.publish("v", ["k1"])
    await wait_for(lambda: events.keys == [("v", ["k1"])], 2.0, "b receiving k1")
    proxy.cut()
    await wait_for(lambda: not a.subscribed, 2.0, "a noticing the partition")
    await a.publish("v", ["k2", "k3"])  # cannot be sent: kept, not raised
    proxy.open = True
    await wait_for(lambda: events.keys[-1:] == [("v", ["k2", "k3"])], 5.0, "b receiving what a wrote meanwhile")
    assert (b.losses, events.lost) == (0, 0)


async def test_too_much_to_replay_makes_every_replica_start_over(partition) -> None:
    proxy, a, _, events = partition
    proxy.cut()
    await wait_for(lambda: not a.subscribed, 2.0, "a noticing the partition")
    await a.publish("v", [f"k{i}" for i in range(10)])  # more than its outbox keeps
    proxy.open = True
    await wait_for(lambda: events.lost == 1, 5.0, "b told to start over")
    assert events.subscribed == 2  # once at start, once more to rebuild
    assert events.keys == []
