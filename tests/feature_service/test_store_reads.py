"""The tiered store's read and write paths on real Redis and Cassandra: read-through, fills, bloom skips."""

from __future__ import annotations

import pytest
import redis

from feature_service.records import Record, entity_key
from feature_service.store import BLOOM, MEMORY
from fresco.servers import RedisServer
from tests.feature_service import rows, wait_for

pytestmark = pytest.mark.integration


def mget_calls(server: RedisServer) -> int:
    client = redis.Redis(port=server.port)
    try:
        return int(client.info("commandstats").get("cmdstat_mget", {}).get("calls", 0))
    finally:
        client.close()


async def test_a_key_only_in_cassandra_reaches_redis_and_memory_in_one_read(make_store, view: str) -> None:
    seed = await make_store()
    [(key, record)] = rows(1)
    await seed.durable.write(view, [(key, record)])  # behind the caches' back, as a restore would
    store = await make_store([view])

    first = await store.read({view: [key]})
    assert first.records[view] == [record]
    assert first.sources[view] == ["cassandra"]
    assert first.served_tiers == ["cassandra"]
    assert not first.degraded
    assert store.guard is not None
    cache = store.guard.tier
    await wait_for(lambda: store.guard.usable() and not store._tasks, what="the background fill")
    assert (await cache.read({view: [key]}))[view] == [record]

    second = await store.read({view: [key]})
    assert (second.records[view], second.sources[view]) == ([record], [MEMORY])
    # Another replica, its memory cold: Redis answers.
    other = await make_store([view])
    third = await other.read({view: [key]})
    assert (third.records[view], third.sources[view], third.served_tiers) == ([record], ["redis"], ["redis"])


async def test_never_written_keys_cost_no_redis_or_cassandra_call(
    make_store, view: str, redis_server: RedisServer
) -> None:
    store = await make_store([view])
    written = rows(5)
    await store.write(view, written)
    store.memory.clear()
    unknown = [entity_key(["nobody", i]) for i in range(100)]
    assert store.blooms is not None
    assert store.blooms.trusted(view)
    assert store.guard is not None
    trips, requests, mgets = store.guard.tier.round_trips, store.durable.requests, mget_calls(redis_server)
    result = await store.read({view: unknown})
    assert result.records[view] == [None] * 100
    # Five keys in a filter sized for 10,000: a false positive among these 100 is astronomically unlikely.
    assert result.sources[view] == [BLOOM] * 100
    assert result.served_tiers == [BLOOM]
    assert (store.guard.tier.round_trips, store.durable.requests) == (trips, requests)
    assert mget_calls(redis_server) == mgets
    # Known keys still go through, in order, among unknown ones.
    mixed = await store.read({view: [unknown[0], written[2][0], unknown[1]]})
    assert mixed.records[view] == [None, written[2][1], None]


async def test_absent_keys_are_remembered_for_a_moment(make_store, view: str) -> None:
    store = await make_store([view], blooms=False)
    key = entity_key(["nobody"])
    first = await store.read({view: [key]})
    assert (first.records[view], first.sources[view]) == ([None], ["cassandra"])
    requests = store.durable.requests
    second = await store.read({view: [key]})
    assert (second.records[view], second.sources[view]) == ([None], [MEMORY])
    assert store.durable.requests == requests
    # A write replaces the negative entry at once.
    record = Record({"x": 1}, 1.0, 1.0)
    await store.write(view, [(key, record)])
    assert (await store.read({view: [key]})).records[view] == [record]


async def test_a_write_reaches_every_tier(make_store, view: str) -> None:
    store = await make_store([view])
    written = rows(10)
    keys = [key for key, _ in written]
    await store.write(view, written)
    assert (await store.durable.read({view: keys}))[view] == [record for _, record in written]
    assert store.guard is not None
    assert (await store.guard.tier.read({view: keys}))[view] == [record for _, record in written]
    assert store.memory.get_many(view, keys) == [record for _, record in written]
    assert store.blooms is not None
    assert all(store.blooms.might_contain_many(view, keys) or [])


async def test_each_key_from_the_shallowest_tier_that_has_it(make_store, view: str) -> None:
    store = await make_store([view])
    (k_mem, r_mem), (k_redis, r_redis), (k_cass, r_cass) = rows(3)
    await store.write(view, [(k_mem, r_mem), (k_redis, r_redis), (k_cass, r_cass)])
    store.memory.invalidate(view, [k_redis, k_cass])
    assert store.guard is not None
    await store.guard.tier.delete(view, [k_cass])
    unknown = entity_key(["nobody"])
    seen: list[tuple[str, int, int]] = []
    store.observer = lambda tier, hits, misses, seconds: seen.append((tier, hits, misses))

    result = await store.read({view: [k_cass, k_mem, unknown, k_redis, k_mem], "empty": []})
    assert result.records[view] == [r_cass, r_mem, None, r_redis, r_mem]
    assert result.sources[view] == ["cassandra", MEMORY, BLOOM, "redis", MEMORY]
    assert result.records["empty"] == []
    assert result.served_tiers == [MEMORY, BLOOM, "redis", "cassandra"]
    assert seen == [(MEMORY, 2, 3), (BLOOM, 1, 2), ("redis", 1, 1), ("cassandra", 1, 0)]
    assert store.stats["redis"].hits >= 1
