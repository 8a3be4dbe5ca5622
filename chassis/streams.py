"""Reading a client stream that a stopping service ends between messages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

T = TypeVar("T")


async def next_or_stop(requests: AsyncIterator[T], stopping: asyncio.Event) -> T | None:
    """The stream's next request; None at its end, or once `stopping` is set (a drain need not wait for idle
    clients, and no request is cut in half)."""
    if stopping.is_set():
        return None
    following = asyncio.ensure_future(anext(requests, None))
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({following, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if following.done():
        return following.result()
    following.cancel()
    return None
