"""Where copies of a version go, ModelMesh-style: only on predictors with room for its expected memory, spread
across zones, the emptiest first; and how many copies its request rate calls for."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

MIB = 1024 * 1024


@dataclass(frozen=True)
class Candidate:
    """A ready predictor as placement sees it."""

    predictor_id: str
    zone: str
    free_bytes: int


@dataclass(frozen=True)
class Placement:
    """The predictors chosen, in order, and why each other candidate was passed over."""

    chosen: tuple[str, ...]
    refused: dict[str, str] = field(default_factory=dict)

    def shortfall(self, wanted: int, need_bytes: int) -> str:
        """Why fewer than `wanted` were chosen, for an error message."""
        reasons = "; ".join(f"{pid}: {why}" for pid, why in sorted(self.refused.items())) or "no ready predictor"
        return (
            f"placed {len(self.chosen)} of {wanted} copies needing {_size(need_bytes)} each; "
            f"the other predictors have no room ({reasons})"
        )


def _size(n: int) -> str:
    return f"{n / MIB:.1f} MiB" if abs(n) >= MIB else f"{n} bytes"


def choose(candidates: Sequence[Candidate], need_bytes: int, count: int, held_zones: Sequence[str]) -> Placement:
    """Up to `count` predictors for new copies: each with at least `need_bytes` free, preferring zones holding
    the fewest copies so far (`held_zones` are the zones of existing copies), then the most free memory, then
    the id (so equal fleets place alike)."""
    zones = Counter(held_zones)
    refused = {c.predictor_id: f"{_size(c.free_bytes)} free" for c in candidates if c.free_bytes < need_bytes}
    fitting = [c for c in candidates if c.free_bytes >= need_bytes]
    chosen: list[str] = []
    while fitting and len(chosen) < count:
        best = min(fitting, key=lambda c: (zones[c.zone], -c.free_bytes, c.predictor_id))
        fitting.remove(best)
        chosen.append(best.predictor_id)
        zones[best.zone] += 1
    return Placement(tuple(chosen), refused)


def desired_copies(current: int, request_rate: float, copy_rate: float, replicas: int, max_replicas: int) -> int:
    """How many copies a version should have: at least `replicas`, at most `max_replicas`, one more when each
    copy serves more than `copy_rate` requests/s, one fewer only when the rest would stay under 70% of it (so a
    rate near a boundary does not make copies come and go)."""
    low, high = replicas, max(replicas, max_replicas)
    if copy_rate <= 0 or current <= 0:
        return max(low, min(current, high))
    wanted = current
    if request_rate > copy_rate * current:
        wanted = math.ceil(request_rate / copy_rate)
    elif current > 1 and request_rate < 0.7 * copy_rate * (current - 1):
        wanted = current - 1
    return max(low, min(wanted, high))


def to_remove(copies: Sequence[tuple[str, str, float]], count: int) -> list[str]:
    """Which `count` copies (predictor id, zone, request rate) to drop: from the zone holding the most, the
    least busy first, so the remaining copies stay spread."""
    zones = Counter(zone for _, zone, _ in copies)
    left = list(copies)
    dropped: list[str] = []
    while left and len(dropped) < count:
        victim = max(left, key=lambda c: (zones[c[1]], -c[2], c[0]))
        left.remove(victim)
        zones[victim[1]] -= 1
        dropped.append(victim[0])
    return dropped
