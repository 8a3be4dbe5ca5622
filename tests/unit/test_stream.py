"""A stream's requests handled a window at a time, answered in the order they came."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator

import pytest

from predictor.stream import in_order


async def _items(count: int, sent: list[int]) -> AsyncIterator[int]:
    for i in range(count):
        sent.append(i)
        yield i


async def test_a_window_of_requests_is_in_flight_at_once_and_answers_keep_their_order() -> None:
    """Items 0..3 are each held until all four are in flight: sequential handling would never get
    there. Item 0 finishes last of them, yet the answers leave in the items' order."""
    sent: list[int] = []
    in_flight: set[int] = set()
    most = 0
    everyone_in = asyncio.Event()

    async def handle(item: int) -> str:
        nonlocal most
        in_flight.add(item)
        most = max(most, len(in_flight))
        if len(in_flight) == 4:
            everyone_in.set()
        if item < 4:
            await everyone_in.wait()
        if item == 0:
            for _ in range(5):
                await asyncio.sleep(0)
        in_flight.discard(item)
        return f"answer-{item}"

    async with asyncio.timeout(10):
        answers = [answer async for answer in in_order(_items(10, sent), handle, window=4)]
    assert answers == [f"answer-{i}" for i in range(10)]
    assert most == 4


async def test_the_window_bounds_what_is_in_flight() -> None:
    sent: list[int] = []
    release = asyncio.Event()
    started: list[int] = []

    async def handle(item: int) -> int:
        started.append(item)
        await release.wait()
        return item

    stream = in_order(_items(10, sent), handle, window=3)
    async with asyncio.timeout(10):
        first = asyncio.ensure_future(anext(stream))
        for _ in range(50):  # every chance to start more than the window
            await asyncio.sleep(0)
        assert started == [0, 1, 2]
        release.set()
        assert await first == 0
        assert [item async for item in stream] == list(range(1, 10))


async def test_leaving_early_cancels_the_work_in_flight() -> None:
    cancelled: list[int] = []
    started: set[int] = set()
    all_started = asyncio.Event()

    async def handle(item: int) -> int:
        started.add(item)
        if len(started) == 5:
            all_started.set()
        if item == 0:
            await all_started.wait()
            return 0
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(item)
            raise
        return item

    async with asyncio.timeout(10):
        stream = in_order(_items(5, []), handle, window=5)
        assert isinstance(stream, AsyncGenerator)
        assert await anext(stream) == 0
        await stream.aclose()
        await asyncio.sleep(0)
    assert sorted(cancelled) == [1, 2, 3, 4]


async def test_a_failing_source_ends_the_stream_with_its_error() -> None:
    async def broken() -> AsyncIterator[int]:
        yield 1
        raise ConnectionError("the client went away")

    async def handle(item: int) -> int:
        return item

    async with asyncio.timeout(10):
        with pytest.raises(ConnectionError):
            [item async for item in in_order(broken(), handle, window=2)]


async def test_a_budget_bounds_the_weight_in_flight_but_one_item_always_goes() -> None:
    """Items weigh their value; with a budget of 10, items 6 and 5 may be in flight together, and a
    heavier one (20) goes alone."""
    started: list[int] = []
    release = asyncio.Event()

    async def heavy_items() -> AsyncIterator[int]:
        for item in (6, 5, 20, 1):
            yield item

    async def handle(item: int) -> int:
        started.append(item)
        await release.wait()
        return item

    stream = in_order(heavy_items(), handle, window=8, weight=lambda item: item, budget=10)
    async with asyncio.timeout(10):
        first = asyncio.ensure_future(anext(stream))
        for _ in range(50):
            await asyncio.sleep(0)
        assert started == [6, 5]  # 11 >= 10: nothing more is read
        release.set()
        assert await first == 6
        assert [item async for item in stream] == [5, 20, 1]
    assert started == [6, 5, 20, 1]
