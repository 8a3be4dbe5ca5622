"""CPU-heavy steps of large calls (decoding, tensor assembly, splitting answers) run in worker
threads, so that one large call does not hold the event loop while small calls wait."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")

# A value costs at least this many bytes on the wire; weights are counted in bytes.
BYTES_PER_VALUE = 8


class Offload:
    """Runs a step inline when its weight (about the bytes it touches) is small, else in a worker.

    Python-level work in a worker thread gives the GIL back every few milliseconds, so the loop
    keeps serving; the worker count bounds how many large calls are worked on at once."""

    def __init__(self, above_bytes: int, workers: int = 2) -> None:
        self.above_bytes = above_bytes
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gateway-offload")

    async def run(self, weight: int, step: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`step(*args, **kwargs)`, in a worker thread when `weight` exceeds the threshold."""
        if weight <= self.above_bytes:
            return step(*args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: step(*args, **kwargs))

    async def close(self) -> None:
        """Let running steps finish, then stop the workers."""
        self._executor.shutdown(wait=True)
