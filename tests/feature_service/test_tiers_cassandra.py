"""The Cassandra tier against a real node: records, key listing, statistics, and failing fast."""

from __future__ import annotations

import time

import pytest

from chassis.errors import Unavailable
from feature_service.records import Record, entity_key
from feature_service.tiers.cassandra import CassandraTier
from fresco.servers import CassandraNode
from fresco.servers._process import free_port
from tests.feature_service import KEYSPACE, rows

pytestmark = pytest.mark.integration


async def test_write_then_read_many_views(cassandra: CassandraTier, view: str) -> None:
    first, second = rows(150, "a"), rows(3, "b")
    await cassandra.write(view, first)
    await cassandra.write(view + "_2", second)
    unknown = entity_key(["nobody"])
    keys = [key for key, _ in first][::-1]
    got = await cassandra.read({view: [*keys, unknown, keys[0]], view + "_2": [key for key, _ in second], "none": []})
    assert got[view] == [*[record for _, record in first][::-1], None, first[-1][1]]
    assert got[view + "_2"] == [record for _, record in second]
    assert got["none"] == []


async def test_keys_of_one_view_are_grouped_into_few_requests(cassandra: CassandraTier, view: str) -> None:
    await cassandra.write(view, rows(250))
    before = cassandra.requests
    got = await cassandra.read({view: [key for key, _ in rows(250)]})
    assert all(record is not None for record in got[view])
    # One node holds every key: requests of up to 100 keys each, not one request per key.
    assert cassandra.requests - before == 3


async def test_overwrite_keeps_the_last_value(cassandra: CassandraTier, view: str) -> None:
    await cassandra.write(view, [("k", Record({"x": 1}, 1.0, 1.0))])
    await cassandra.write(view, [("k", Record({"x": 2}, 2.0, 2.0))])
    assert (await cassandra.read({view: ["k"]}))[view] == [Record({"x": 2}, 2.0, 2.0)]
    # Within one write too, though its rows share batches (and so timestamps).
    await cassandra.write(view, [("j", Record({"x": 9}, 1.0, 1.0)), ("j", Record({"x": 3}, 3.0, 3.0))])
    assert (await cassandra.read({view: ["j"]}))[view] == [Record({"x": 3}, 3.0, 3.0)]


async def test_writes_go_in_small_batches(cassandra: CassandraTier, view: str) -> None:
    written = rows(500)
    big = Record({"blob": "x" * 20_000}, 1.0, 1.0)  # larger than a batch: it goes on its own
    before = cassandra.requests
    await cassandra.write(view, [*written, ("big", big)])
    # 501 rows as ~16 index batches (one per bucket) and ~51 record batches, not 1002 statements.
    assert cassandra.requests - before < 100
    got = await cassandra.read({view: [*(key for key, _ in written), "big"]})
    assert got[view] == [*(record for _, record in written), big]
    assert len([key async for key in cassandra.keys(view)]) == 501


async def test_keys_lists_a_whole_view_page_by_page(cassandra_server: CassandraNode, view: str) -> None:
    tier = await CassandraTier.open([cassandra_server.contact_point], cassandra_server.port, KEYSPACE, page_size=7)
    try:
        written = rows(300)
        await tier.write(view, written)
        await tier.write(view + "_other", rows(5, "other"))
        listed = [key async for key in tier.keys(view)]
        assert sorted(listed) == sorted(key for key, _ in written)
        assert [key async for key in tier.keys(view + "_empty")] == []
    finally:
        await tier.close()


async def test_statistics_are_saved_and_replaced(cassandra: CassandraTier, view: str) -> None:
    assert await cassandra.load_statistics(view) is None
    await cassandra.save_statistics(view, b"\x00first")
    await cassandra.save_statistics(view, b"\x00second")
    assert await cassandra.load_statistics(view) == b"\x00second"


async def test_nothing_listening_is_unavailable_quickly() -> None:
    began = time.monotonic()
    with pytest.raises(Unavailable, match=r"^cassandra: "):
        await CassandraTier.open(["127.0.0.1"], free_port(), KEYSPACE, connect_timeout_s=1.0)
    assert time.monotonic() - began < 15.0  # not the driver's default waits


async def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="keyspace"):
        await CassandraTier.open(["127.0.0.1"], 9042, "no-dashes")
    with pytest.raises(ValueError, match="consistency"):
        await CassandraTier.open(["127.0.0.1"], 9042, KEYSPACE, consistency="MOST")
