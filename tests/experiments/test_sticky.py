"""Sticky bandit arms on a real Redis and on SQLite files shared by separate stores and processes: the first
claim wins, later proposals (re-weighting) never move a unit, many units go in one call, and clients or
processes racing on the same units agree."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from chassis.errors import Unavailable
from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.experiments.evaluator import Evaluator, config_of
from fresco.experiments.sticky import RedisStickyArms, SqliteStickyArms, StickyArms
from fresco.servers import RedisServer
from fresco.servers.pytest_plugin import redis_server

__all__ = ["redis_server"]

Factory = Callable[[], StickyArms]


@pytest.fixture(params=["redis", "sqlite"])
async def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Factory]:
    """Makes clients of one store: each its own Redis connection (one key prefix per test) or its own SQLite
    connection and thread on one file."""
    clients: list[Redis] = []
    stores: list[SqliteStickyArms] = []
    prefix = f"test:{uuid.uuid4().hex[:10]}:"

    def make() -> StickyArms:
        if request.param == "redis":
            server: RedisServer = request.getfixturevalue("redis_server")
            clients.append(Redis.from_url(server.url))
            return RedisStickyArms(clients[-1], prefix=prefix)
        stores.append(SqliteStickyArms(tmp_path / "sticky" / "arms.db"))
        return stores[-1]

    yield make
    for client in clients:
        await client.aclose()
    for store in stores:
        await store.close()


def units(count: int, start: int = 0) -> list[str]:
    return [f"u{i}" for i in range(start, start + count)]


async def test_the_first_claim_wins(new_store: Factory) -> None:
    one, two = new_store(), new_store()
    assert await one.claim("exp", 1, "user_id", {"u1": ("arm0", 0)}) == {"u1": ("arm0", 0)}
    assert await two.claim("exp", 1, "user_id", {"u1": ("arm1", 3)}) == {"u1": ("arm0", 0)}
    assert await one.claim("exp", 1, "user_id", {"u1": ("arm2", 4)}) == {"u1": ("arm0", 0)}
    assert await one.claim("exp", 1, "user_id", {}) == {}
    # Another phase, unit type or experiment is another unit; arm names may hold the separator.
    assert await two.claim("exp", 2, "user_id", {"u1": ("arm:b", 0)}) == {"u1": ("arm:b", 0)}
    assert await two.claim("exp", 1, "session_id", {"u1": ("arm1", 0)}) == {"u1": ("arm1", 0)}
    assert await two.claim("exp2", 1, "user_id", {"u1": ("arm1", 0)}) == {"u1": ("arm1", 0)}


async def test_reweighting_never_moves_a_unit(new_store: Factory) -> None:
    one, two = new_store(), new_store()
    first = await one.claim("exp", 1, "user_id", {u: (f"arm{i % 2}", 0) for i, u in enumerate(units(300))})
    # Allocation 1 proposes arm1 for everyone, old and new units alike.
    later = await two.claim("exp", 1, "user_id", {u: ("arm1", 1) for u in units(600)})
    assert {u: later[u] for u in units(300)} == first
    assert sum(arm == "arm0" for arm, _ in first.values()) == 150
    assert {later[u] for u in units(300, 300)} == {("arm1", 1)}


async def test_many_units_in_one_call(new_store: Factory) -> None:
    store = new_store()
    proposals = {u: (f"arm{i % 3}", 2) for i, u in enumerate(units(2_600))}  # several script calls / batches
    assert await store.claim("exp", 1, "user_id", proposals) == proposals
    mixed = {u: ("armX", 5) for u in units(2_000, 1_600)}
    got = await new_store().claim("exp", 1, "user_id", mixed)
    assert got == {u: proposals.get(u, ("armX", 5)) for u in mixed}


async def test_concurrent_claims_from_two_clients_agree(new_store: Factory) -> None:
    one, two, reader = new_store(), new_store(), new_store()
    for round_ in range(5):
        batch = units(400, 400 * round_)
        a, b = await asyncio.gather(
            one.claim("race", 1, "user_id", {u: ("a", round_) for u in batch}),
            two.claim("race", 1, "user_id", {u: ("b", round_) for u in reversed(batch)}),
        )
        assert a == b
        assert set(a.values()) <= {("a", round_), ("b", round_)}
        assert await reader.claim("race", 1, "user_id", {u: ("c", 9) for u in batch}) == a


# Each process claims the same units with its own arm once told to go, and prints what it got.
_RACER = """
import asyncio, json, sys
from redis.asyncio import Redis
from fresco.experiments.sticky import RedisStickyArms, SqliteStickyArms

async def main(kind, where, arm, count):
    client = Redis.from_url(where) if kind == "redis" else None
    store = RedisStickyArms(client, prefix="race:") if client else SqliteStickyArms(where)
    print("ready", flush=True)
    sys.stdin.readline()
    got = await store.claim("race", 1, "user_id", {f"u{i}": (arm, 0) for i in range(count)})
    print(json.dumps(got), flush=True)
    if client:
        await client.aclose()
    else:
        await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
async def test_processes_racing_on_the_same_units_agree(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        where = server.url
        client = Redis.from_url(where)
        await client.delete(*[f"race:race:1:user_id:u{i}" for i in range(1_000)])
    else:
        where = str(tmp_path / "arms.db")
    racers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _RACER,
            kind,
            where,
            f"arm{n}",
            "1000",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for n in range(3)
    ]
    for racer in racers:  # every process has imported and opened its store before any claims
        assert racer.stdout is not None
        assert (await racer.stdout.readline()).strip() == b"ready"
    outputs = await asyncio.gather(*(racer.communicate(b"go\n") for racer in racers))
    assert [racer.returncode for racer in racers] == [0, 0, 0]
    results = [{u: tuple(v) for u, v in json.loads(out).items()} for out, _ in outputs]
    assert results[0] == results[1] == results[2]
    assert len(results[0]) == 1_000
    assert set(results[0].values()) <= {("arm0", 0), ("arm1", 0), ("arm2", 0)}
    proposals = {f"u{i}": ("late", 1) for i in range(1_000)}
    if kind == "redis":
        assert await RedisStickyArms(client, prefix="race:").claim("race", 1, "user_id", proposals) == results[0]
        await client.aclose()
    else:
        store = SqliteStickyArms(where)
        assert await store.claim("race", 1, "user_id", proposals) == results[0]
        await store.close()


async def test_redis_claims_with_one_script_call_per_batch(redis_server: RedisServer) -> None:
    async with Redis.from_url(redis_server.url, decode_responses=True) as client:
        store = RedisStickyArms(client, prefix=f"test:{uuid.uuid4().hex[:10]}:")
        await store.claim("exp", 1, "user_id", {"u0": ("arm0", 0)})

        async def evalsha_calls() -> int:
            stats = await client.info("commandstats")
            return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

        before = await evalsha_calls()
        got = await store.claim("exp", 1, "user_id", {u: ("arm1", 0) for u in units(1_200)})
        assert await evalsha_calls() - before == 3  # 500 units a script, all in one pipelined round trip
        assert got["u0"] == ("arm0", 0)
        assert got["u1199"] == ("arm1", 0)


async def test_arms_survive_a_redis_restart_and_the_script_is_loaded_again(tmp_path: Path) -> None:
    with RedisServer(data_dir=tmp_path / "redis", appendonly=True) as server:
        async with Redis.from_url(server.url) as client:
            store = RedisStickyArms(client)
            first = await store.claim("exp", 1, "user_id", {u: ("arm0", 0) for u in units(10)})
            await asyncio.to_thread(server.restart)  # a new process: no scripts cached, the arms in its AOF
            proposals = {u: ("arm1", 1) for u in units(20)}
            deadline = asyncio.get_running_loop().time() + 30
            while True:  # the client's connection died with the old process; its pool reconnects
                try:
                    got = await store.claim("exp", 1, "user_id", proposals)
                    break
                except Unavailable:
                    assert asyncio.get_running_loop().time() < deadline, "no claim went through after the restart"
                    await asyncio.sleep(0.05)
            assert {u: got[u] for u in units(10)} == first
            assert {got[u] for u in units(10, 10)} == {("arm1", 1)}


async def test_redis_ttl_is_renewed_by_every_claim(redis_server: RedisServer) -> None:
    async with Redis.from_url(redis_server.url) as client:
        store = RedisStickyArms(client, prefix=f"test:{uuid.uuid4().hex[:10]}:", ttl_seconds=3600)
        await store.claim("exp", 1, "user_id", {"u1": ("arm0", 0)})
        key = store.key("exp", 1, "user_id", "u1")
        assert 3500 < await client.ttl(key) <= 3600
        assert await client.get(key) == b"0:arm0"
        await client.expire(key, 600)  # long enough to outlast any stall of a loaded machine before the claim
        assert await store.claim("exp", 1, "user_id", {"u1": ("arm1", 1)}) == {"u1": ("arm0", 0)}
        assert await client.ttl(key) > 600
        no_ttl = RedisStickyArms(client, prefix=store.prefix)
        await no_ttl.claim("exp", 1, "user_id", {"u2": ("arm0", 0)})
        assert await client.ttl(no_ttl.key("exp", 1, "user_id", "u2")) == -1
    with pytest.raises(ValueError, match="ttl_seconds"):
        RedisStickyArms(client, ttl_seconds=0)


async def test_an_unreachable_or_closed_store_is_unavailable(tmp_path: Path) -> None:
    # A port held bound but not listening refuses every connection; a port merely free a moment ago could be taken.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        client = Redis(port=held.getsockname()[1], socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))
        with pytest.raises(Unavailable, match="redis"):
            await RedisStickyArms(client).claim("exp", 1, "user_id", {"u1": ("arm0", 0)})
        await client.aclose()
    store = SqliteStickyArms(tmp_path / "arms.db")
    await store.close()
    with pytest.raises(Unavailable, match="closed"):
        await store.claim("exp", 1, "user_id", {"u1": ("arm0", 0)})


async def test_an_in_memory_sqlite_store_keeps_first_arms() -> None:
    store = SqliteStickyArms()
    assert await store.claim("exp", 1, "user_id", {"u1": ("arm0", 0)}) == {"u1": ("arm0", 0)}
    assert await store.claim("exp", 1, "user_id", {"u1": ("arm1", 1), "u2": ("arm1", 1)}) == {
        "u1": ("arm0", 0),
        "u2": ("arm1", 1),
    }
    await store.close()


async def test_the_evaluator_settles_bandit_arms_through_a_store(new_store: Factory) -> None:
    def bandit(weights: tuple[float, float], allocation: int) -> Evaluator:
        arms = [xpb.Arm(name=f"arm{i}", weight=w, model_version=i + 1) for i, w in enumerate(weights)]
        experiment = xpb.Experiment(
            key="bandit", model_name="m", unit_type="user_id", coverage=1.0, arms=arms, version=2,
            phases=[xpb.Phase(number=1)], type=xpb.EXPERIMENT_TYPE_BANDIT,
        )  # fmt: skip
        return Evaluator(apb.AssignmentConfig(revision=1, experiments=[config_of(experiment, allocation)]))

    before, after = bandit((0.5, 0.5), 0), bandit((0.05, 0.95), 1)
    first = await before.settle([before.assign({"user_id": u}, {})[0] for u in units(400)], new_store())
    settled = await after.settle([after.assign({"user_id": u}, {})[0] for u in units(400)], new_store())
    assert [(a.arm_name, a.model_version, a.allocation) for a in settled] == [
        (a.arm_name, a.model_version, 0) for a in first
    ]
    assert sum(a.arm_name == "arm0" for a in settled) > 150  # the new weights alone would give about 20
