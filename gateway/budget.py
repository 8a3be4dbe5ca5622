"""A call's time budget: the caller's deadline shared by every hop of the call, so each hop gets
what remains and never the whole budget again."""

from __future__ import annotations

import time
from collections.abc import Callable

from chassis.errors import DeadlineExceeded


class Budget:
    """What remains of one call's deadline; without a caller deadline each hop has its own default."""

    def __init__(self, time_remaining: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # 0 is a deadline that has already passed, not "no deadline": only None means unset.
        self._deadline = None if time_remaining is None else clock() + time_remaining

    @property
    def bounded(self) -> bool:
        """Whether the caller set a deadline."""
        return self._deadline is not None

    def remaining(self) -> float | None:
        """Seconds left of the caller's deadline (may be negative), or None without one."""
        return None if self._deadline is None else self._deadline - self._clock()

    def for_hop(self, hop: str, default_s: float) -> float:
        """The timeout of the next call to `hop`: what remains of the caller's deadline, or the hop's
        default when the caller set none; DEADLINE_EXCEEDED when nothing remains."""
        left = self.remaining()
        if left is None:
            return default_s
        if left <= 0:
            raise DeadlineExceeded(f"the call's deadline passed before {hop} could be asked")
        return left
