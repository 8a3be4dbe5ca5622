"""Tests of the feature service: tiers, bloom filters and the tiered store against real Redis and Cassandra."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from feature_service.records import Record, entity_key

KEYSPACE = "fresco_features_test"


def rows(count: int, tag: str = "") -> list[tuple[str, Record]]:
    """count rows of distinct entities, their values telling them apart."""
    return [
        (entity_key([i, tag]), Record({"i": i, "tag": tag, "vec": [0.5, i]}, 1.0 + i, 2.0 + i)) for i in range(count)
    ]


async def wait_for(condition: Callable[[], object], within: float = 10.0, what: str = "condition") -> None:
    """Poll until condition() is true, yielding to the loop, or fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met within {within}s"
        await asyncio.sleep(0.05)
