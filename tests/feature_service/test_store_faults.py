"""The tiered store when Redis or Cassandra dies and comes back: reads degrade instead of failing, writes
stay durable, nothing stale is served afterwards, and every connection comes back by itself."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis

from chassis.errors import Unavailable
from feature_service.records import Record, entity_key
from feature_service.store import BLOOM, MEMORY, UNAVAILABLE
from fresco.servers import CassandraNode, RedisServer
from tests.feature_service import rows, wait_for

pytestmark = pytest.mark.integration


async def test_redis_outage(make_store, view: str, prefix: str, tmp_path: Path) -> None:
    # appendonly: the restarted Redis still holds what it held before, so a stale value would show.
    with RedisServer(data_dir=tmp_path, appendonly=True) as server:
        store = await make_store([view], redis_url=server.url)
        assert store.blooms is not None
        assert store.invalidator is not None
        key, other = entity_key(["changes"]), entity_key(["stays"])
        old, new, kept = Record({"x": 1}, 1.0, 1.0), Record({"x": 2}, 2.0, 2.0), Record({"y": 1}, 1.0, 1.0)
        await store.write(view, [(key, old), (other, kept)])
        assert store.blooms.trusted(view)

        server.kill()
        # Losing the invalidation channel means writes may be missed: no bloom or memory entry is trusted.
        await wait_for(lambda: not store.blooms.trusted(view), 3.0, "blooms untrusted")
        assert len(store.memory) == 0
        began = time.monotonic()
        during = await store.read({view: [other, entity_key(["nobody"])]})
        assert during.records[view] == [kept, None]
        assert during.sources[view] == ["cassandra", "cassandra"]
        assert (during.degraded, during.failed_tiers) == (True, ["redis"])
        await store.write(view, [(key, new)])  # durable: acknowledged without Redis
        assert time.monotonic() - began < 10.0  # no wait on Redis's timeouts or retries
        assert (await store.read({view: [key]})).records[view] == [new]

        server.start()
        client = redis.Redis(port=server.port)
        assert client.get(f"{prefix}{view}:{key}") == old.encode()  # the stale value is there...
        client.close()
        await wait_for(lambda: store.guard is not None and store.guard.usable(), 5.0, "redis usable again")
        store.memory.clear()
        after = await store.read({view: [key, other]})
        assert after.records[view] == [new, kept]  # ...but never served
        assert not after.degraded
        assert after.sources[view][1] == "redis"  # the pool reconnected by itself
        # Subscribed again, the blooms are rebuilt from Cassandra and trusted.
        await wait_for(lambda: store.blooms.trusted(view), 5.0, "blooms trusted again")
        assert (await store.read({view: [entity_key(["nobody"])]})).sources[view] == [BLOOM]


async def test_cassandra_outage(make_store, view: str, cassandra_server: CassandraNode) -> None:
    store = await make_store([view])
    (cached, r_cached), (cold, r_cold) = rows(2)
    await store.write(view, [(cached, r_cached), (cold, r_cold)])
    store.memory.clear()
    assert store.guard is not None
    await store.guard.tier.delete(view, [cold])  # now only Cassandra has it
    unknown = entity_key(["nobody"])

    cassandra_server.kill()
    try:
        result = await store.read({view: [cached, cold, unknown]})
        assert result.records[view] == [r_cached, UNAVAILABLE, None]
        assert result.sources[view] == ["redis", UNAVAILABLE.value, BLOOM]
        assert (result.degraded, result.failed_tiers) == (True, ["cassandra"])
        assert (await store.read({view: [cached]})).sources[view] == [MEMORY]
        began = time.monotonic()
        with pytest.raises(Unavailable, match=r"^cassandra: "):
            await store.write(view, rows(1, "during"))
        assert time.monotonic() - began < 10.0  # refused, not retried until a timeout
    finally:
        # On this thread: the node dies with the thread that started it.
        cassandra_server.start()

    # The driver reconnects by itself; writes are accepted again once it has.
    deadline = time.monotonic() + 30
    while True:
        try:
            await store.write(view, rows(1, "after"))
            break
        except Unavailable:
            assert time.monotonic() < deadline, "writes still refused 30 s after Cassandra came back"
            await asyncio.sleep(0.25)
    assert (await store.read({view: [cold]})).records[view] == [r_cold]
