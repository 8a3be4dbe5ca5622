"""The last event wins, in every tier: SQLite, Cassandra, Redis and memory keep per key the record with the latest
event time (ties: the later arrival), whatever order writes arrive in, through pushes, materialisations and
fills, and with two writers racing on one key."""

from __future__ import annotations

import asyncio
import itertools
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import msgpack
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest

from feature_service.materialize import Materializer, MaterializeSpec
from feature_service.reader import Catalog
from feature_service.records import DurableTier, Record, entity_key
from feature_service.store import TieredStore
from feature_service.tiers.cassandra import CassandraTier
from feature_service.tiers.memory import MemoryCache
from feature_service.tiers.sqlite import SQLiteTier
from feature_service.writer import FeatureWriter
from fresco.api.common.v1 import values_pb2 as vpb
from fresco.api.features.v1 import feature_service_pb2 as pb
from fresco.features import parse_definitions
from tests.feature_service import wait_for

pytestmark = pytest.mark.integration

T = 1_780_000_000.0
# Four versions of one key, oldest first: event times decide; at equal event times, the later arrival.
VERSIONS = [
    Record({"x": 1}, T, T + 50),
    Record({"x": 2}, T + 10, T + 1),
    Record({"x": 3}, T + 10, T + 2),  # same event as the one before, arrived a second later
    Record({"x": 4}, T + 20, T + 0.5),  # the latest event, though it arrived first
]

DEFINITIONS = """
entities:
  - {name: user, join_keys: [{name: user_id, type: int64}]}
feature_views:
  - name: scores
    entities: [user]
    features:
      - {name: score, type: double}
"""


@pytest.fixture(params=["sqlite", "cassandra"])
async def durable(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[DurableTier]:
    if request.param == "sqlite":
        tier: DurableTier = SQLiteTier(tmp_path / "f.db")
        await tier.connect()  # type: ignore[attr-defined]
    else:
        cassandra = request.getfixturevalue("cassandra_server")
        tier = await CassandraTier.open([cassandra.contact_point], cassandra.port, "fresco_features_test")
    yield tier
    await tier.close()


async def test_every_arrival_order_keeps_the_last_event(durable: DurableTier, view: str) -> None:
    orders = list(itertools.permutations(VERSIONS))
    # Each order into a key of its own, one write per version: 24 keys written in 4 rounds.
    for step in range(len(VERSIONS)):
        await asyncio.gather(*(durable.write(view, [(f"k{i}", order[step])]) for i, order in enumerate(orders)))
    found = (await durable.read({view: [f"k{i}" for i in range(len(orders))]}))[view]
    assert found == [VERSIONS[-1]] * len(orders)
    # In one batch too.
    await durable.write(view, [("batch", v) for v in reversed(VERSIONS)])
    assert (await durable.read({view: ["batch"]}))[view] == [VERSIONS[-1]]


async def test_equal_event_times_go_to_the_later_arrival_in_every_tier(
    durable: DurableTier, view: str, redis_server
) -> None:
    from feature_service.tiers.redis import RedisTier

    early, late = Record({"x": "b"}, T, T + 1.000001), Record({"x": "a"}, T, T + 1.000002)
    await durable.write(view, [("k", late)])
    await durable.write(view, [("k", early)])
    await durable.write(view, [("j", early)])
    await durable.write(view, [("j", late)])
    assert (await durable.read({view: ["k", "j"]}))[view] == [late, late]
    cache = RedisTier(redis_server.url, key_prefix=f"order:{view}:")
    memory = MemoryCache()
    try:
        await cache.fill(view, [("k", late)])
        floored = await cache.floor(view, [("k", early.head())])
        assert floored == [2]  # Redis holds a record at least as recent
        assert await cache.commit(view, [("k", early)], floored) == [False]
        memory.put_many(view, [("k", late)])
        memory.put_many(view, [("k", early)])
        assert (await cache.read({view: ["k"]}))[view] == memory.get_many(view, ["k"]) == [late]
    finally:
        await cache.close()


async def test_sqlite_records_of_the_earlier_format_are_ordered_too(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE records (view TEXT NOT NULL, entity TEXT NOT NULL, record BLOB NOT NULL, "
                 "PRIMARY KEY (view, entity)) WITHOUT ROWID")  # fmt: skip
    old = msgpack.packb({"f": {"x": 9}, "e": T + 100, "w": T + 100}, use_bin_type=True)
    conn.execute("INSERT INTO records VALUES ('v', 'k', ?)", (old,))
    conn.commit()
    conn.close()
    tier = SQLiteTier(path)
    await tier.connect()
    try:
        assert await tier.write("v", [("k", VERSIONS[-1])]) == {"k": Record({"x": 9}, T + 100, T + 100)}
        assert (await tier.read({"v": ["k"]}))["v"] == [Record({"x": 9}, T + 100, T + 100)]
    finally:
        await tier.close()


async def test_memory_never_replaces_a_later_event() -> None:
    memory = MemoryCache()
    memory.put_many("v", [("k", VERSIONS[3])])
    memory.put_many("v", [("k", VERSIONS[0])])
    memory.put_many("v", [("k", VERSIONS[1])], since=memory.fill_token())
    assert memory.get_many("v", ["k"]) == [VERSIONS[3]]


async def everywhere(stores: Sequence[TieredStore], view: str, keys: list[str]) -> list[list[object]]:
    """What each replica serves, what Redis and Cassandra hold, for keys."""
    out: list[list[object]] = []
    for store in stores:
        out.append(list((await store.read({view: keys})).records[view]))
    await wait_for(lambda: not any(store._tasks for store in stores), what="background fills")
    store = stores[0]
    assert store.guard is not None
    cached = (await store.guard.tier.read({view: keys}))[view]
    out.append([record for record in cached if record is not None])  # floors read as misses
    out.append(list((await store.durable.read({view: keys}))[view]))
    return out


async def test_out_of_order_pushes_on_two_replicas(make_store, view: str) -> None:
    a = await make_store([view])
    b = await make_store([view])
    key = entity_key(["user", 1])
    await a.write(view, [(key, VERSIONS[3])])
    await b.write(view, [(key, VERSIONS[1])])
    await a.write(view, [(key, VERSIONS[0])])
    await b.write(view, [(key, VERSIONS[2])])
    assert await everywhere([a, b], view, [key]) == [[VERSIONS[3]]] * 4
    # Redis held the latest: a later event replaces it there and in both memories.
    latest = Record({"x": 5}, T + 30, T + 3)
    await b.write(view, [(key, latest)])
    await wait_for(lambda: a.memory.get_many(view, [key]) != [VERSIONS[3]], what="a's memory dropping the key")
    assert await everywhere([a, b], view, [key]) == [[latest]] * 4


def scores_file(path: Path, ids: list[int], score: float, event: float) -> Path:
    table = {"user_id": pa.array(ids, pa.int64()), "score": [score] * len(ids), "event_timestamp": [event] * len(ids)}
    pq.write_table(pa.table(table), path)
    return path


async def test_materialising_older_data_after_newer_pushes(make_store, view: str, tmp_path: Path) -> None:
    catalog = Catalog(parse_definitions(DEFINITIONS.replace("scores", view)))
    a = await make_store([view])
    b = await make_store([view])
    now = time.time()

    async def stream() -> AsyncIterator[pb.PushFeaturesRequest]:
        rows = [
            pb.FeatureRow(
                entity_key=vpb.EntityKey(join_keys={"user_id": vpb.Value(int64_value=i)}),
                features={"score": vpb.Value(double_value=1.0)},
            )
            for i in (1, 2, 3)
        ]
        yield pb.PushFeaturesRequest(feature_view=view, rows=rows)

    pushed = await FeatureWriter(catalog, a).push(stream())
    assert pushed.accepted == 3
    keys = [entity_key([i]) for i in (1, 2, 3, 4)]
    await b.read({view: keys})  # b caches the pushed values in its memory and Redis
    source = scores_file(tmp_path / "old.parquet", [1, 2, 3, 4], 0.0, now - 3600)  # a backfill, an hour old
    outcome = await Materializer(catalog, b, b.durable, source_dirs=[tmp_path]).run(MaterializeSpec(view, str(source)))
    assert outcome.rows_written == 4
    for served in await everywhere([a, b], view, keys):
        assert [r.features["score"] if isinstance(r, Record) else r for r in served] == [1.0, 1.0, 1.0, 0.0]


async def test_two_writers_racing_on_one_key(make_store, view: str) -> None:
    a = await make_store([view])
    b = await make_store([view])
    key = entity_key(["raced"])
    rng = random.Random(7)
    versions = [Record({"x": i}, T + rng.randrange(1000) / 10, T + i / 1000) for i in range(60)]
    winner = max(versions, key=lambda r: (r.rank(), r.encode()))
    shuffled = versions[:]
    rng.shuffle(shuffled)

    async def writer(store: TieredStore, mine: list[Record]) -> None:
        for record in mine:
            await store.write(view, [(key, record)])
            await store.read({view: [key]})  # reads interleaved: fills race the writes too

    await asyncio.gather(writer(a, shuffled[0::2]), writer(b, shuffled[1::2]))
    await a.drain()
    await b.drain()
    await wait_for(lambda: b.memory.get_many(view, [key]) in ([None], [winner]), what="b's memory settling")
    await wait_for(lambda: a.memory.get_many(view, [key]) in ([None], [winner]), what="a's memory settling")
    assert await everywhere([a, b], view, [key]) == [[winner]] * 4


async def test_two_sqlite_writers_racing_on_one_file(tmp_path: Path) -> None:
    """Two processes' tiers on one file (the service and `fresco features materialize` in process)."""
    first, second = SQLiteTier(tmp_path / "f.db"), SQLiteTier(tmp_path / "f.db")
    await first.connect()
    await second.connect()
    rng = random.Random(11)
    versions = [Record({"x": i}, T + rng.randrange(1000) / 10, T + i / 1000) for i in range(60)]
    winner = max(versions, key=lambda r: (r.rank(), r.encode()))
    rng.shuffle(versions)

    async def writer(tier: SQLiteTier, mine: list[Record]) -> None:
        for record in mine:
            await tier.write("v", [("k", record)])

    try:
        await asyncio.gather(writer(first, versions[0::2]), writer(second, versions[1::2]))
        assert (await first.read({"v": ["k"]}))["v"] == (await second.read({"v": ["k"]}))["v"] == [winner]
    finally:
        await first.close()
        await second.close()


async def test_materialising_older_data_after_newer_pushes_on_sqlite(tmp_path: Path) -> None:
    catalog = Catalog(parse_definitions(DEFINITIONS))
    tier = SQLiteTier(tmp_path / "f.db")
    await tier.connect()
    store = TieredStore(MemoryCache(), None, tier, None)
    try:

        async def stream() -> AsyncIterator[pb.PushFeaturesRequest]:
            key = vpb.EntityKey(join_keys={"user_id": vpb.Value(int64_value=1)})
            row = pb.FeatureRow(entity_key=key, features={"score": vpb.Value(double_value=1.0)})
            yield pb.PushFeaturesRequest(feature_view="scores", rows=[row])

        assert (await FeatureWriter(catalog, store).push(stream())).accepted == 1
        source = scores_file(tmp_path / "old.parquet", [1, 2], 0.0, time.time() - 3600)
        materializer = Materializer(catalog, store, tier, source_dirs=[tmp_path])
        assert (await materializer.run(MaterializeSpec("scores", str(source)))).rows_written == 2
        keys = [entity_key([1]), entity_key([2])]
        for records in (
            (await store.read({"scores": keys})).records["scores"],
            (await tier.read({"scores": keys}))["scores"],
        ):
            assert [r.features["score"] if isinstance(r, Record) else r for r in records] == [1.0, 0.0]
    finally:
        await store.close()
