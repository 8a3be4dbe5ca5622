"""Choosing a version and a replica for a request, the same way in every process that reads a route.

The split is sticky: a unit (a user, a session) hashes with the route's split seed to a fixed point
u in [0, 1), and the versions, in the route's stable order with the baseline first, cover [0, 1) in
consecutive slices as wide as their shares. A unit's point never moves, so changing weights moves
only the units whose slice boundary it crosses: raising the canary's weight (taken from the
baseline) moves units from the baseline to the canary and none back. Replicas are chosen by
rendezvous hashing: each endpoint scores the key, the best healthy one wins, the next ones are the
failover order, and removing a replica moves only the keys it had."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from typing import Final

from model_manager.routes import Endpoint, ModelRoute, VersionRoute

_POINT_BITS: Final = 64


def _hash64(*parts: str) -> int:
    # Length-prefixed, so ("ab", "c") and ("a", "bc") hash apart; blake2b is stable across processes
    # and machines, unlike the built-in hash().
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        data = part.encode()
        digest.update(len(data).to_bytes(4, "big"))
        digest.update(data)
    return int.from_bytes(digest.digest(), "big")


def unit_point(unit_id: str, split_seed: str) -> int:
    """The unit's fixed point in the split, an integer in [0, 2**64): u = point / 2**64."""
    return _hash64("unit", split_seed, unit_id)


def _version_at(route: ModelRoute, scaled: int) -> VersionRoute:
    """The version whose slice holds `scaled`, a position in [0, total weight)."""
    upper = 0
    for version in route.versions:
        upper += version.weight
        if scaled < upper:
            return version
    raise AssertionError(f"position {scaled} is past the total weight {route.total_weight}")


def sticky_version(route: ModelRoute, unit_id: str) -> VersionRoute:
    """The version a unit is routed to: the same for every request of the unit while weights hold."""
    # floor(u * total) < upper bound  ⇔  u < upper bound / total: exact in integers, so the slices
    # are compared at the point's full precision whatever the total weight is.
    scaled = (unit_point(unit_id, route.split_seed) * route.total_weight) >> _POINT_BITS
    return _version_at(route, scaled)


def random_version(route: ModelRoute, rng: random.Random) -> VersionRoute:
    """A weighted random draw, for a request that carries no unit id."""
    return _version_at(route, rng.randrange(route.total_weight))


def split_version(route: ModelRoute, unit_id: str | None, rng: random.Random) -> VersionRoute:
    """The version for a request: sticky by its unit id when it has one, a random draw otherwise."""
    return sticky_version(route, unit_id) if unit_id else random_version(route, rng)


def rendezvous_order(key: str, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
    """The endpoints in the key's preference order: the first serves, the next ones are failovers."""
    return sorted(endpoints, key=lambda e: (_hash64("replica", key, e.address), e.address), reverse=True)


def choose_endpoint(key: str, endpoints: Sequence[Endpoint], healthy: Callable[[Endpoint], bool]) -> Endpoint | None:
    """The key's most preferred healthy endpoint, or None when none is healthy."""
    return next((e for e in rendezvous_order(key, endpoints) if healthy(e)), None)
