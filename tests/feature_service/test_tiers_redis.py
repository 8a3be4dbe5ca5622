"""The Redis tier against a real redis-server: one round trip per batch, TTLs, and failing fast when down."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis

from chassis.errors import Unavailable
from feature_service.records import Record, entity_key
from feature_service.tiers.redis import CacheGuard, RedisTier
from fresco.servers import RedisServer
from tests.feature_service import rows, wait_for

pytestmark = pytest.mark.integration


def command_calls(server: RedisServer, command: str) -> int:
    """How many times Redis ran a command, from its own INFO commandstats."""
    client = redis.Redis(port=server.port)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_write_then_read_many_views(redis_server: RedisServer, prefix: str) -> None:
    tier = RedisTier(redis_server.url, key_prefix=prefix)
    try:
        first, second = rows(20, "a"), rows(5, "b")
        await tier.fill("v1", first)
        await tier.fill("v2", second)
        unknown = entity_key(["nobody"])
        keys1 = [*[key for key, _ in first][::-1], unknown]
        got = await tier.read({"v1": keys1, "v2": [key for key, _ in second], "v3": [], "v4": [unknown]})
        assert got["v1"] == [*[record for _, record in first][::-1], None]
        assert got["v2"] == [record for _, record in second]
        assert got["v3"] == []
        assert got["v4"] == [None]
    finally:
        await tier.close()


async def test_a_read_of_many_views_is_one_round_trip(redis_server: RedisServer, prefix: str) -> None:
    tier = RedisTier(redis_server.url, key_prefix=prefix)
    try:
        for view in ("a", "b", "c"):
            await tier.fill(view, rows(50, view))
        trips, mgets = tier.round_trips, command_calls(redis_server, "mget")
        got = await tier.read({view: [key for key, _ in rows(50, view)] for view in ("a", "b", "c")})
        assert all(record is not None for records in got.values() for record in records)
        assert tier.round_trips - trips == 1
        assert command_calls(redis_server, "mget") - mgets == 1  # one MGET of every view's keys, not one GET per key
    finally:
        await tier.close()


async def test_values_expire_with_the_ttl(redis_server: RedisServer, prefix: str) -> None:
    tier = RedisTier(redis_server.url, key_prefix=prefix, ttl_s=60.0)
    short = RedisTier(redis_server.url, key_prefix=prefix, ttl_s=0.2)
    client = redis.Redis(port=redis_server.port)
    try:
        [(key, record)] = rows(1)
        await tier.fill("v", [(key, record)])
        assert 59_000 < client.pttl(f"{prefix}v:{key}") <= 60_000
        await short.fill("w", [(key, record)])
        assert (await short.read({"w": [key]}))["w"] == [record]
        await asyncio.sleep(0.35)
        assert (await short.read({"w": [key]}))["w"] == [None]
    finally:
        client.close()
        await tier.close()
        await short.close()


async def test_writes_and_fills_keep_the_last_event(redis_server: RedisServer, prefix: str) -> None:
    tier = RedisTier(redis_server.url, key_prefix=prefix)
    try:
        old, new, newer = Record({"x": 1}, 1.0, 1.0), Record({"x": 2}, 2.0, 2.0), Record({"x": 3}, 3.0, 1.5)

        async def write(key: str, record: Record) -> bool:
            """As the store writes: floor, (the durable write), commit."""
            floored = await tier.floor("v", [(key, record.head())])
            return (await tier.commit("v", [(key, record)], floored))[0]

        await tier.fill("v", [("k", new)])  # Redis holds the durable tier's record...
        assert await write("k", old) is False  # ...so an older event leaves it
        assert (await tier.read({"v": ["k"]}))["v"] == [new]
        assert await write("k", newer) is True  # ...and a later one replaces it
        await tier.fill("v", [("k", new), ("j", old)])  # a fill never replaces a later event either
        assert (await tier.read({"v": ["k", "j"]}))["v"] == [newer, old]
        # Same event time: the later arrival wins, in whatever order they come.
        early, late = Record({"x": 4}, 9.0, 5.0), Record({"x": 5}, 9.0, 6.0)
        assert await write("k", late) is True
        assert await write("k", early) is False
        assert (await tier.read({"v": ["k"]}))["v"] == [late]
        # Where Redis held nothing it cannot know the durable tier's latest: the write leaves a floor, read as a
        # miss, which a fill older than the write cannot pass and the durable tier's value can.
        assert await write("fresh", new) is False
        await tier.fill("v", [("fresh", old)])
        assert (await tier.read({"v": ["fresh"]}))["v"] == [None]
        await tier.fill("v", [("fresh", newer)])
        assert (await tier.read({"v": ["fresh"]}))["v"] == [newer]
        # A writer that floored then died (or whose durable write timed out): older records are gone for good.
        assert await tier.floor("v", [("fresh", Record({}, 10.0, 10.0).head())]) == [1]
        assert (await tier.read({"v": ["fresh"]}))["v"] == [None]
        await tier.fill("v", [("fresh", newer)])
        assert (await tier.read({"v": ["fresh"]}))["v"] == [None]
        # Two writers: the later event floors over the earlier one, whose commit then leaves the floor alone.
        await tier.fill("v", [("raced", old)])
        first = await tier.floor("v", [("raced", new.head())])
        second = await tier.floor("v", [("raced", newer.head())])
        assert (first, second) == ([1], [0])
        assert await tier.commit("v", [("raced", new)], first) == [False]
        assert await tier.commit("v", [("raced", newer)], second) == [False]  # Redis did not hold its record
        assert (await tier.read({"v": ["raced"]}))["v"] == [None]
        await tier.delete("v", ["k", "j"])
        assert (await tier.read({"v": ["k", "j"]}))["v"] == [None, None]
    finally:
        await tier.close()


async def test_the_script_is_loaded_again_after_redis_forgets_it(redis_server: RedisServer, prefix: str) -> None:
    tier = RedisTier(redis_server.url, key_prefix=prefix)
    client = redis.Redis(port=redis_server.port)
    try:
        await tier.fill("v", rows(1))
        client.script_flush()
        await tier.fill("v", rows(2))
        assert (await tier.read({"v": [key for key, _ in rows(2)]}))["v"] == [r for _, r in rows(2)]
    finally:
        client.close()
        await tier.close()


async def test_flush_removes_only_its_prefix(redis_server: RedisServer, prefix: str) -> None:
    mine = RedisTier(redis_server.url, key_prefix=prefix)
    other = RedisTier(redis_server.url, key_prefix=prefix + "other*[x]:")
    try:
        await mine.fill("v", rows(2500))
        await other.fill("v", rows(3))
        assert await other.flush() == 3  # the glob characters in that prefix are matched literally
        assert await mine.flush(batch=500) == 2500
        assert (await mine.read({"v": [key for key, _ in rows(3)]}))["v"] == [None, None, None]
    finally:
        await mine.close()
        await other.close()


async def test_an_unreadable_value_is_a_miss(redis_server: RedisServer, prefix: str) -> None:
    tier = RedisTier(redis_server.url, key_prefix=prefix)
    client = redis.Redis(port=redis_server.port)
    try:
        client.set(f"{prefix}v:bad", b"\xc1 not msgpack")
        assert (await tier.read({"v": ["bad"]}))["v"] == [None]
    finally:
        client.close()
        await tier.close()


async def test_down_fails_fast_and_comes_back_by_itself(tmp_path: Path) -> None:
    with RedisServer(data_dir=tmp_path) as server:
        tier = RedisTier(server.url, timeout_s=0.3)
        try:
            await tier.fill("v", rows(3))
            server.kill()
            for _ in range(3):
                began = time.monotonic()
                with pytest.raises(Unavailable, match=r"^redis: "):
                    await tier.read({"v": ["k"]})
                with pytest.raises(Unavailable, match=r"^redis: "):
                    await tier.fill("v", rows(1))
                assert time.monotonic() - began < 5.0  # refused at once, not retried for long
            server.start()
            # The same tier, with no reconnect call: the pool replaces the dead connections.
            await tier.fill("v", rows(1))
            assert (await tier.read({"v": [rows(1)[0][0]]}))["v"] == [rows(1)[0][1]]
        finally:
            await tier.close()


async def test_guard_floors_what_redis_missed_before_trusting_it_again(tmp_path: Path) -> None:
    # appendonly: the restarted Redis still holds the values from before the outage, stale ones included.
    with RedisServer(data_dir=tmp_path, appendonly=True) as server:
        tier = RedisTier(server.url, timeout_s=0.3)
        guard = CacheGuard(tier, retry_s=0.1, max_dirty_keys=10)
        try:
            old, new = Record({"x": 1}, 1.0, 1.0), Record({"x": 2}, 2.0, 2.0)
            await tier.fill("v", [("k", old), ("kept", old)])
            server.kill()
            assert await guard.floor("v", [("k", new.head())]) is None  # the write reaches the durable tier only
            assert not guard.usable()
            with pytest.raises(Unavailable):
                await guard.read({"v": ["k"]})
            server.start()
            # Stale, as the guard assumes (read without yielding to the loop, so the repair cannot run first).
            client = redis.Redis(port=server.port)
            assert client.get("fresco:features:v:k") == old.encode()
            client.close()
            await wait_for(guard.usable)
            assert (await guard.read({"v": ["k", "kept"]}))["v"] == [None, old]
            # Too many missed keys to list: everything under the prefix goes.
            server.kill()
            assert await guard.floor("v", [(key, record.head()) for key, record in rows(11)]) is None
            server.start()
            await wait_for(guard.usable)
            assert (await tier.read({"v": ["kept"]}))["v"] == [None]
        finally:
            await guard.close()
            await tier.close()
