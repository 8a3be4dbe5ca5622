"""A Redis batch whose answer is lost after Redis ran it (the connection cut, or the client gone) counts once: the
immediate retry and any later resend find its rows already recorded, by outcome id and by unit, and answer them
duplicates."""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections.abc import AsyncIterator

import pytest

from chassis.errors import Unavailable
from experiment_service.stats_redis import RedisStats
from experiment_service.stats_store import MAX_AMOUNT, Verdict
from fresco.servers import RedisServer
from fresco.servers.pytest_plugin import redis_server
from tests.experiment_service.stats_support import T0, Reference, covariate, exposure, outcome, plan

__all__ = ["redis_server"]

A, D = Verdict.ACCEPTED, Verdict.DUPLICATE


class AnswerCutter:
    """A TCP proxy to Redis that, for the next `drops` scripts run through it, lets the request reach Redis, waits
    for Redis's answer (so the script has run) and then cuts the client off instead of passing the answer on."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.drops = 0
        self.dropped = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> AnswerCutter:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        ran_script = False

        async def requests() -> None:
            nonlocal ran_script
            while data := await reader.read(65536):
                ran_script = ran_script or b"EVALSHA" in data.upper()
                up_writer.write(data)
                await up_writer.drain()

        async def answers() -> None:
            while data := await up_reader.read(65536):
                if ran_script and self.drops > 0:  # Redis answered, so the script ran: the client never hears it
                    self.drops -= 1
                    self.dropped += 1
                    return
                writer.write(data)
                await writer.drain()

        with contextlib.suppress(ConnectionError):
            _, pending = await asyncio.wait(
                {asyncio.ensure_future(requests()), asyncio.ensure_future(answers())},
                return_when=asyncio.FIRST_COMPLETED,
            )
            for task in pending:
                task.cancel()
        writer.close()
        up_writer.close()


@pytest.fixture
async def cutter(redis_server: RedisServer) -> AsyncIterator[AnswerCutter]:
    proxy = await AnswerCutter(redis_server.port).start()
    yield proxy
    await proxy.close()


@pytest.fixture
async def store(cutter: AnswerCutter) -> AsyncIterator[RedisStats]:
    opened = RedisStats.from_url(f"redis://127.0.0.1:{cutter.port}/0", prefix=f"test:{uuid.uuid4().hex[:10]}:")
    yield opened
    await opened.close()


async def test_a_batch_whose_answer_is_lost_is_retried_once_and_counted_once(
    store: RedisStats, cutter: AnswerCutter
) -> None:
    p = plan()
    shown = [exposure("u1", "control"), exposure("u2", "treatment")]
    assert await store.record_exposures(p, shown, T0) == [A, A]  # loads the script: no NOSCRIPT round below
    rows = [outcome("o1", "u1", "spend", 5.0), outcome("o2", "u2", "spend", 7.0), covariate("c1", "u1", "spend", 3.0)]
    cutter.drops = 1
    # The first run recorded the rows and its answer was cut; the client's one retry finds them recorded.
    assert await store.record_outcomes(p, rows, T0) == [D, D, D]
    assert cutter.dropped == 1
    reference = Reference(p)
    reference.add([*shown, *rows])
    assert await store.arm_stats("checkout", 1) == reference.arm_stats()


async def test_a_batch_refused_unavailable_after_redis_ran_it_counts_once_when_resent(
    store: RedisStats, cutter: AnswerCutter
) -> None:
    p = plan()
    first = [exposure("u1", "control")]
    assert await store.record_exposures(p, first, T0) == [A]
    later = [exposure("u2", "treatment", at_h=0.5)]
    rows = [outcome("o1", "u1", "spend", 5.0), outcome("o2", "u2", "spend", 7.0)]
    cutter.drops = 2  # the call and its one retry: the caller is told UNAVAILABLE
    with pytest.raises(Unavailable):
        await store.record_exposures(p, later, T0)
    cutter.drops = 2
    with pytest.raises(Unavailable):
        await store.record_outcomes(p, rows, T0)
    assert cutter.dropped == 4
    # Resent as a client does for an unanswered batch: Redis already holds every row, so nothing counts twice.
    assert await store.record_exposures(p, later, T0) == [D]
    assert await store.record_outcomes(p, rows, T0) == [D, D]
    reference = Reference(p)
    reference.add([*first, *later, *rows])
    assert await store.arm_stats("checkout", 1) == reference.arm_stats()
    assert await store.units_by_allocation("checkout", 1) == {"control": {0: 1}, "treatment": {0: 1}}


async def test_the_largest_accepted_amounts_never_fail_the_script_midway(store: RedisStats) -> None:
    # A script that fails after its first write keeps what it wrote: amounts are bounded so that none can fail.
    p = plan()
    shown = [exposure("u1", "control"), exposure("u2", "treatment")]
    assert await store.record_exposures(p, shown, T0) == [A, A]
    rows = [outcome(f"o{i}", f"u{i % 2 + 1}", "spend", MAX_AMOUNT * (-1) ** (i // 2)) for i in range(40)]
    rows += [outcome(f"v{i}", "u1", event, MAX_AMOUNT) for i, event in enumerate(["view", "click"] * 20)]
    assert await store.record_outcomes(p, rows, T0) == [A] * len(rows)
    stats = await store.arm_stats("checkout", 1)
    values = [getattr(s, name) for arm in stats.values() for s in arm.values() for name in ("sx", "sxx", "sy", "sxy")]
    assert all(math.isfinite(v) for v in values)
    assert stats["control"]["ctr"].sx == pytest.approx(20 * MAX_AMOUNT, rel=1e-12)
