"""Working on a stream of requests a window at a time: up to `window` requests are in flight at
once, so that a stream's requests batch together, and their answers leave in the order the requests
came in, so that a client that matches answers by position (not by id) still gets the right ones."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


async def in_order(
    items: AsyncIterator[Item],
    handle: Callable[[Item], Awaitable[Result]],
    window: int,
    weight: Callable[[Item], int] = lambda item: 0,
    budget: int = 0,
) -> AsyncIterator[Result]:
    """`handle` each item, up to `window` at once, yielding results in the items' order. With a
    `budget`, no further item is read while the items in flight weigh that much or more.

    `handle` should turn its failures into results: one that raises ends the stream. Leaving the
    iteration early (the caller went away) cancels the work still in flight.
    """
    pending: deque[tuple[asyncio.Future[Result], int]] = deque()
    held = 0
    next_item: asyncio.Future[Item] | None = None
    exhausted = False
    try:
        while True:
            while pending and pending[0][0].done():
                done, weighed = pending.popleft()
                held -= weighed
                yield done.result()
            if exhausted and not pending:
                return
            waits: set[asyncio.Future[Any]] = set()
            room = len(pending) < window and (not budget or not pending or held < budget)
            if not exhausted and room:
                if next_item is None:
                    next_item = asyncio.ensure_future(anext(items))
                waits.add(next_item)
            if pending:
                waits.add(pending[0][0])
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if next_item is not None and next_item.done():
                try:
                    item = next_item.result()
                except StopAsyncIteration:
                    exhausted = True
                else:
                    weighed = weight(item)
                    held += weighed
                    pending.append((asyncio.ensure_future(handle(item)), weighed))
                next_item = None
    finally:
        leftover: list[asyncio.Future[Any]] = [future for future, _ in pending]
        if next_item is not None:
            leftover.append(next_item)
        for future in leftover:
            future.cancel()
