"""The Redis tier and the invalidation channel against a real Redis Cluster of 3 primaries: reads across slots
batched per slot, per-key ordered writes, TTLs, and a primary going down failing clearly, never serving stale or
wrong values."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from chassis.errors import Unavailable
from feature_service.invalidation import Invalidator
from feature_service.records import Record, entity_key
from feature_service.tiers.redis import CacheGuard, RedisTier
from fresco.servers import RedisClusterServers
from tests.feature_service import rows, wait_for

pytestmark = pytest.mark.integration


def ports_of(cluster: RedisClusterServers, names: list[str]) -> list[int]:
    """The port of the primary holding each key, from the cluster's own slot map."""
    client = redis.RedisCluster.from_url(cluster.url)
    try:
        return [int(client.get_node_from_key(name).port) for name in names]  # type: ignore[union-attr]
    finally:
        client.close()


def command_calls(cluster: RedisClusterServers, command: str) -> int:
    """How many times the cluster's nodes ran a command, from their INFO commandstats."""
    total = 0
    for node in cluster.nodes:
        client = redis.Redis(port=node.port)
        try:
            total += int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))
        finally:
            client.close()
    return total


async def test_a_read_across_slots_is_one_pipeline_of_an_mget_per_slot(
    redis_cluster: RedisClusterServers, prefix: str
) -> None:
    tier = RedisTier(redis_cluster.url, key_prefix=prefix, cluster=True)
    try:
        data = {view: rows(60, view) for view in ("a", "b", "c")}
        for view, view_rows in data.items():
            await tier.fill(view, view_rows)
        names = [f"{prefix}{view}:{key}" for view, view_rows in data.items() for key, _ in view_rows]
        # Under the same names as on a single Redis, spread over every primary.
        assert set(ports_of(redis_cluster, names)) == {node.port for node in redis_cluster.nodes}
        client = redis.RedisCluster.from_url(redis_cluster.url)
        assert client.exists(*names) == len(names)
        client.close()
        unknown = entity_key(["nobody"])
        trips, mgets, gets = tier.round_trips, command_calls(redis_cluster, "mget"), command_calls(redis_cluster, "get")
        got = await tier.read(
            {
                "a": [*[key for key, _ in data["a"]][::-1], unknown],
                "b": [],
                "c": [unknown] + [key for key, _ in data["c"]],
            }
        )
        assert got["a"] == [*[record for _, record in data["a"]][::-1], None]
        assert got["b"] == []
        assert got["c"] == [None, *[record for _, record in data["c"]]]
        assert tier.round_trips - trips == 1
        read = [f"{prefix}a:{key}" for key, _ in data["a"]] + [f"{prefix}c:{key}" for key, _ in data["c"]]
        read += [f"{prefix}a:{unknown}", f"{prefix}c:{unknown}"]
        assert command_calls(redis_cluster, "mget") - mgets == len({key_slot(name.encode()) for name in read})
        assert command_calls(redis_cluster, "get") == gets  # never a GET per key
    finally:
        await tier.close()


async def test_writes_keep_the_last_event_per_key_across_slots(redis_cluster: RedisClusterServers, prefix: str) -> None:
    tier = RedisTier(redis_cluster.url, key_prefix=prefix, cluster=True)
    try:
        keys = [entity_key([i]) for i in range(200)]
        held, older, newer = Record({"x": 2}, 2.0, 2.0), Record({"x": 1}, 1.5, 1.5), Record({"x": 3}, 3.0, 3.0)
        await tier.fill("v", [(key, held) for key in keys[::2]])  # even keys hold a record, odd ones nothing
        # Answers come back in the keys' order, whatever slot and node each key lives on.
        assert await tier.floor("v", [(key, older.head()) for key in keys]) == [2, 0] * 100
        floored = await tier.floor("v", [(key, newer.head()) for key in keys])
        assert floored == [1, 0] * 100
        assert await tier.commit("v", [(key, newer) for key in keys], floored) == [True, False] * 100
        assert (await tier.read({"v": keys}))["v"] == [newer, None] * 100
        await tier.fill("v", [(key, held) for key in keys])  # older than the floors and records: nothing changes
        assert (await tier.read({"v": keys}))["v"] == [newer, None] * 100
        await tier.fill("v", [(key, newer) for key in keys])  # the durable tier's record passes the floors
        assert (await tier.read({"v": keys}))["v"] == [newer] * 200
        await tier.delete("v", keys[:50])
        assert (await tier.read({"v": keys}))["v"] == [None] * 50 + [newer] * 150
    finally:
        await tier.close()


async def test_ttl_script_reload_and_flush_on_every_node(redis_cluster: RedisClusterServers, prefix: str) -> None:
    tier = RedisTier(redis_cluster.url, key_prefix=prefix, ttl_s=60.0, cluster=True)
    short = RedisTier(redis_cluster.url, key_prefix=prefix, ttl_s=0.2, cluster=True)
    other = RedisTier(redis_cluster.url, key_prefix=prefix + "other*[x]:", cluster=True)
    try:
        data = rows(300)
        await tier.fill("v", data)
        names = [f"{prefix}v:{key}" for key, _ in data[:20]]
        for name, port in zip(names, ports_of(redis_cluster, names), strict=True):
            client = redis.Redis(port=port)
            assert 59_000 < client.pttl(name) <= 60_000
            client.close()
        await short.fill("w", data[:50])
        assert (await short.read({"w": [key for key, _ in data[:50]]}))["w"] == [r for _, r in data[:50]]
        await asyncio.sleep(0.35)
        assert (await short.read({"w": [key for key, _ in data[:50]]}))["w"] == [None] * 50
        for node in redis_cluster.nodes:  # every node forgets the script: it is loaded again
            client = redis.Redis(port=node.port)
            client.script_flush()
            client.close()
        await other.fill("v", data[:3])
        assert (await other.read({"v": [key for key, _ in data[:3]]}))["v"] == [r for _, r in data[:3]]
        assert await other.flush() == 3
        assert await tier.flush(batch=100) == 300
        assert (await tier.read({"v": [key for key, _ in data]}))["v"] == [None] * 300
        await tier.ping()
    finally:
        for each in (tier, short, other):
            await each.close()


async def test_a_primary_down_fails_clearly_and_nothing_stale_is_served_after(tmp_path: Path) -> None:
    # appendonly: the restarted primary still holds the values from before the outage, stale ones included.
    with RedisClusterServers(data_dir=tmp_path, appendonly=True) as cluster:
        tier = RedisTier(cluster.url, timeout_s=0.3, cluster=True)
        guard = CacheGuard(tier, retry_s=0.1)
        try:
            old, new, newer = Record({"x": 1}, 1.0, 1.0), Record({"x": 2}, 2.0, 2.0), Record({"x": 3}, 3.0, 3.0)
            keys = [entity_key([i]) for i in range(100)]  # on every node
            await tier.fill("v", [(key, old) for key in keys])
            down = cluster.nodes[1]
            ports = ports_of(cluster, [f"fresco:features:v:{key}" for key in keys])
            on_down = [key for key, port in zip(keys, ports, strict=True) if port == down.port]
            assert on_down
            down.kill()
            for _ in range(3):
                began = time.monotonic()
                with pytest.raises(Unavailable, match=r"^redis: "):
                    await tier.read({"v": keys})
                with pytest.raises(Unavailable, match=r"^redis: "):  # lands on the live primaries only
                    await tier.fill("v", [(key, new) for key in keys])
                with pytest.raises(Unavailable, match=r"^redis: "):
                    await tier.ping()
                assert time.monotonic() - began < 10.0  # a clear error soon, not retried for long
            # A write while a primary is down: the guard remembers it, and trusts Redis again only once repaired.
            assert await guard.floor("v", [(key, newer.head()) for key in keys]) is None
            assert not guard.usable()
            down.start()
            cluster.wait_ok()
            # Stale, as the guard assumes (read without yielding to the loop, so the repair cannot run first).
            client = redis.Redis(port=down.port)
            assert [client.get(f"fresco:features:v:{key}") for key in on_down] == [old.encode()] * len(on_down)
            client.close()
            await wait_for(guard.usable, 20.0, "the guard repairing the cluster")
            # Every value cached before the write is floored, on every node: a miss, for the durable tier to answer.
            assert (await guard.read({"v": keys}))["v"] == [None] * 100
            await tier.fill("v", [(key, new) for key in keys])
            assert (await tier.read({"v": keys}))["v"] == [None] * 100
            await tier.fill("v", [(key, newer) for key in keys])
            assert (await tier.read({"v": keys}))["v"] == [newer] * 100
        finally:
            await guard.close()
            await tier.close()


def invalidator(cluster: RedisClusterServers, origin: str, channel: str) -> Invalidator:
    return Invalidator(
        cluster.url, channel=channel, origin=origin, heartbeat_s=0.3, backoff_s=(0.05, 0.3), cluster=True
    )


async def test_invalidation_goes_through_any_node_and_survives_one_failing(tmp_path: Path) -> None:
    with RedisClusterServers(data_dir=tmp_path) as cluster:
        heard: list[tuple[str, list[str]]] = []
        events: list[str] = []
        a = invalidator(cluster, "a", "writes")
        a.attach(
            lambda view, keys: heard.append((view, keys)), lambda: events.append("lost"), lambda: events.append("up")
        )
        assert await a.start()
        others: list[Invalidator] = []

        async def publisher(same_node: bool) -> Invalidator:
            """A replica going through a's node, or through another: replicas start at nodes picked by origin."""
            for i in range(100):
                other = invalidator(cluster, f"b{len(others)}-{i}", "writes")
                others.append(other)
                assert await other.start()  # subscribed: node_name is known
                if (other.node_name == a.node_name) == same_node:
                    return other
            raise AssertionError("no replica went through the node asked for")

        try:
            b, c = await publisher(same_node=False), await publisher(same_node=True)
            await b.publish("v", ["k1", "k2"])  # through another node than a's: the cluster bus carries it
            await wait_for(lambda: heard == [("v", ["k1", "k2"])], 5.0, "a hearing b's write")
            # a's node fails: a is told (on_lost), and subscribes again through another node.
            lost_node = a.node_name
            next(node for node in cluster.nodes if f"127.0.0.1:{node.port}" == lost_node).kill()
            await wait_for(lambda: events[-2:] == ["lost", "up"] and a.subscribed, 15.0, "a subscribing again")
            assert a.node_name != lost_node
            await b.publish("v", ["k3"])
            await wait_for(lambda: heard[-1:] == [("v", ["k3"])], 10.0, "a hearing b's write after the failure")
            # c went through the failed node too: its announcement waits in its outbox, and goes out through the
            # next node once c has moved on.
            await c.publish("v", ["k4"])
            await wait_for(lambda: heard[-1:] == [("v", ["k4"])], 10.0, "a hearing c's write after the failure")
            assert c.node_name != lost_node
        finally:
            await a.close()
            for other in others:
                await other.close()


async def test_two_store_replicas_share_a_cluster(make_store, redis_cluster: RedisClusterServers, view: str) -> None:
    a = await make_store([view], redis_url=redis_cluster.url, redis_cluster=True)
    b = await make_store([view], redis_url=redis_cluster.url, redis_cluster=True)
    keys = [entity_key([i]) for i in range(50)]
    v1 = [(key, Record({"x": 1}, 1.0, 1.0)) for key in keys]
    await b.write(view, v1)
    first = await a.read({view: keys})
    assert (first.records[view], first.sources[view]) == ([record for _, record in v1], ["redis"] * 50)
    v2 = [(key, Record({"x": 2}, 2.0, 2.0)) for key in keys]
    await b.write(view, v2)  # a hears of it through the cluster, drops the keys from memory, reads the new values
    await wait_for(lambda: a.memory.get_many(view, keys) == [None] * 50, 5.0, "a's memory dropping the keys")
    assert (await a.read({view: keys})).records[view] == [record for _, record in v2]
