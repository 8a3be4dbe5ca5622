"""Caches that cannot stay stale, on real Redis and Cassandra: a write that may be durable always finishes its
cache work (cancelled callers, timeouts that applied), a replica cut off from Redis cannot leave the others
serving what it overwrote, and bloom filters heal from the durable tier."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Mapping, Sequence

import pytest

from chassis.errors import Unavailable
from feature_service.records import Record, entity_key
from feature_service.store import BLOOM, TieredStore
from feature_service.tiers.cassandra import CassandraTier
from tests.feature_service import wait_for

pytestmark = pytest.mark.integration

V1, V2 = Record({"x": 1}, 1_780_000_000.0, 1_780_000_001.0), Record({"x": 2}, 1_780_000_100.0, 1_780_000_101.0)


class PausingCassandra(CassandraTier):
    """The real tier; after each durable write it tells the test, then yields once before returning, so the test
    can cancel the writer right after the durable write."""

    written: asyncio.Event | None = None

    async def write(self, view: str, rows: Sequence[tuple[str, Record]]) -> Mapping[str, Record] | None:
        result = await super().write(view, rows)
        if self.written is not None:
            self.written.set()
        await asyncio.sleep(0)
        return result


class TimingOutCassandra(CassandraTier):
    """The real tier, whose writes can be made to answer a timeout: after applying the first `apply` rows (all by
    default), as a Cassandra write timeout that was applied anyway, or half applied, does."""

    timeout = False
    apply: int | None = None

    async def write(self, view: str, rows: Sequence[tuple[str, Record]]) -> Mapping[str, Record] | None:
        if not self.timeout:
            return await super().write(view, rows)
        await super().write(view, rows[: self.apply])
        raise Unavailable("cassandra: OperationTimedOut: errors={'127.0.0.1:9042': 'Client request timeout'}")


async def served(store: TieredStore, view: str, key: str) -> Record | None:
    record = (await store.read({view: [key]})).records[view][0]
    assert record is None or isinstance(record, Record)
    return record


def idle(store: TieredStore) -> Callable[[], bool]:
    return lambda: not store._tasks


async def cached_everywhere(a: TieredStore, b: TieredStore, view: str, key: str, record: Record) -> None:
    """a writes `record`; once b has heard of it, both replicas serve it from memory, and Redis holds it."""
    assert b.invalidator is not None
    heard = b.invalidator.received
    await a.write(view, [(key, record)])
    await wait_for(lambda: b.invalidator is not None and b.invalidator.received > heard, what="b hearing of it")
    for store in (a, b):
        await store.read({view: [key]})
        await wait_for(idle(store), what="background fills")
        assert store.memory.get_many(view, [key]) == [record]
    assert a.guard is not None
    assert (await a.guard.tier.read({view: [key]}))[view] == [record]


async def test_a_push_cancelled_after_the_durable_write_still_updates_every_cache(make_store, view: str) -> None:
    a = await make_store([view], durable_class=PausingCassandra)
    b = await make_store([view])
    assert isinstance(a.durable, PausingCassandra)
    assert b.invalidator is not None
    key = entity_key(["cancelled"])
    await cached_everywhere(a, b, view, key, V1)

    written = a.durable.written = asyncio.Event()
    push = asyncio.create_task(a.write(view, [(key, V2)]))
    await written.wait()
    push.cancel()  # the caller goes away (cancelled, or its deadline passed) right after the durable write
    with pytest.raises(asyncio.CancelledError):
        await push
    await a.drain()
    assert a.guard is not None
    assert (await a.guard.tier.read({view: [key]}))[view] in ([V2], [None])  # updated, or floored: never V1
    await wait_for(lambda: b.memory.get_many(view, [key]) == [None], what="b hearing of the write")
    assert await served(a, view, key) == V2
    assert await served(b, view, key) == V2


async def test_a_writer_that_dies_after_the_durable_write_leaves_redis_serving_nothing_stale(
    make_store, view: str
) -> None:
    a = await make_store([view], durable_class=PausingCassandra)
    b = await make_store([view])
    assert isinstance(a.durable, PausingCassandra)
    key = entity_key(["crashed"])
    await cached_everywhere(a, b, view, key, V1)
    written = a.durable.written = asyncio.Event()
    push = asyncio.create_task(a.write(view, [(key, V2)]))
    await written.wait()
    for task in list(a._writes):
        task.cancel()  # the process dies here: no cache work, no notice
    with pytest.raises(asyncio.CancelledError):
        await push
    # b's memory may serve V1 until its memory TTL (it never heard of the write); Redis never does.
    b.memory.clear()
    assert await served(b, view, key) == V2
    c = await make_store([view])
    assert await served(c, view, key) == V2


async def test_close_waits_for_cache_work_under_way(make_store, view: str) -> None:
    a = await make_store([view], durable_class=PausingCassandra)
    b = await make_store([view])
    assert isinstance(a.durable, PausingCassandra)
    key = entity_key(["closing"])
    await cached_everywhere(a, b, view, key, V1)
    written = a.durable.written = asyncio.Event()
    push = asyncio.create_task(a.write(view, [(key, V2)]))
    await written.wait()
    push.cancel()
    await a.close()  # a replica shutting down (SIGTERM) right after a durable write
    with pytest.raises(asyncio.CancelledError):
        await push
    b.memory.clear()
    assert await served(b, view, key) == V2


@pytest.mark.parametrize("applied", [True, False], ids=["applied", "not-applied"])
async def test_a_write_timeout_invalidates_every_cache_tier_before_the_error(
    make_store, view: str, applied: bool
) -> None:
    a = await make_store([view], durable_class=TimingOutCassandra)
    b = await make_store([view])
    assert isinstance(a.durable, TimingOutCassandra)
    assert b.invalidator is not None
    key = entity_key(["timed out"])
    await cached_everywhere(a, b, view, key, V1)

    a.durable.timeout, a.durable.apply = True, (None if applied else 0)
    heard = b.invalidator.received
    with pytest.raises(Unavailable, match="OperationTimedOut"):
        await a.write(view, [(key, V2)])
    # Before the error was answered: gone from a's memory, floored in Redis, announced to the other replicas.
    assert a.memory.get_many(view, [key]) == [None]
    assert a.guard is not None
    assert (await a.guard.tier.read({view: [key]}))[view] == [None]
    await wait_for(lambda: b.invalidator.received > heard, what="b hearing of the write")
    expected = V2 if applied else V1
    assert await served(a, view, key) == expected
    assert await served(b, view, key) == expected


def dead_redis_url() -> str:
    """A Redis URL where nothing listens: a replica cut off from Redis while the others reach it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


async def test_a_replica_cut_off_from_redis_cannot_leave_the_others_serving_stale(make_store, view: str) -> None:
    b = await make_store([view])
    key, other = entity_key(["overwritten"]), entity_key(["untouched"])
    await b.write(view, [(key, V1), (other, V1)])
    await b.read({view: [key, other]})
    await wait_for(lambda: not b._tasks, what="background fills")
    assert b.guard is not None
    assert (await b.guard.tier.read({view: [key]}))[view] == [V1]

    a = await make_store([view], redis_url=dead_redis_url())
    await a.write(view, [(key, V2)])  # acknowledged: durable, Redis missed, the miss logged in Cassandra
    assert a.guard is not None
    assert not a.guard.usable()

    # Within one poll of the miss log, b neither serves V1 from memory nor from Redis, nor fills it back.
    assert b.misses is not None
    assert await b.misses.poll() >= 1
    assert b.memory.get_many(view, [key]) == [None]
    assert (await b.guard.tier.read({view: [key, other]}))[view] == [None, V1]
    assert await served(b, view, key) == V2
    c = await make_store([view])  # a replica started afterwards, its memory cold, reading through Redis
    assert await served(c, view, key) == V2
    assert b.misses is not None
    assert await b.misses.poll() == 0  # each logged miss is applied once


async def test_the_miss_log_is_followed_in_the_background(make_store, view: str) -> None:
    b = await make_store([view], miss_poll_s=0.2)
    key = entity_key(["overwritten"])
    await b.write(view, [(key, V1)])
    assert await served(b, view, key) == V1
    a = await make_store([view], redis_url=dead_redis_url())
    await a.write(view, [(key, V2)])
    await wait_for(lambda: b.memory.get_many(view, [key]) == [None], what="b applying the miss log")
    assert await served(b, view, key) == V2


@pytest.mark.parametrize("case", ["lost notice", "crashed writer", "half-applied write"])
async def test_bloom_filters_heal(make_store, view: str, cassandra, case: str) -> None:
    b = await make_store([view])
    assert b.blooms is not None
    assert b.blooms.trusted(view)
    keys = [entity_key([case, i]) for i in range(4)]
    rows = [(key, V1) for key in keys]
    durable = keys
    if case == "lost notice":
        a = await make_store([view], invalidation=False)  # its announcement never reaches b
        await a.write(view, rows)
    elif case == "crashed writer":
        await cassandra.write(view, rows)  # durable, then the writer died before any cache work or notice
    else:
        a = await make_store([view], durable_class=TimingOutCassandra, invalidation=False)
        assert isinstance(a.durable, TimingOutCassandra)
        a.durable.timeout, a.durable.apply = True, 2  # two rows applied, then a timeout; no notice either
        with pytest.raises(Unavailable):
            await a.write(view, rows)
        durable = keys[:2]
    assert (await b.read({view: keys})).sources[view] == [BLOOM] * 4  # b missed every write
    await b.refresh_blooms()
    result = await b.read({view: keys})
    assert [key for key, record in zip(keys, result.records[view], strict=True) if record is not None] == durable
    assert b.blooms.trusted(view)


async def test_bloom_filters_are_refreshed_in_the_background(make_store, view: str, cassandra) -> None:
    b = await make_store([view], bloom_refresh_s=0.2)
    key = entity_key(["crashed"])
    await cassandra.write(view, [(key, V1)])
    await wait_for(lambda: b.blooms is not None and b.blooms.might_contain_many(view, [key]) == [True])
    assert await served(b, view, key) == V1
