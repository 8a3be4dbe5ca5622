"""The raw redis-py peer: the same read straight from Redis in the benchmark process, with no service in
between. For each call, one pipeline (no transaction) holding one MGET per view of the very keys Fresco's
service reads (its own layout, `fresco:features:<view>:<key>`), then every value's features decoded from
msgpack: 100 entities × 40 features in hand, as a caller of the service gets them. redis-py's sync client
with its hiredis parser, as a hand-written reader would use it."""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from typing import Any

import msgpack
import redis

from bench.features import data
from bench.features.fresco_side import Timed
from feature_service.records import HEAD_BYTES, entity_key
from feature_service.tiers.redis import DEFAULT_PREFIX


def _collections() -> list[int]:
    return [generation["collections"] for generation in gc.get_stats()]


class RawRedisPeer:
    """A redis-py client on Fresco's database of the benchmark's Redis."""

    def __init__(self, port: int, db: int) -> None:
        self.client = redis.Redis(host="127.0.0.1", port=port, db=db)

    def close(self) -> None:
        self.client.close()

    @staticmethod
    def keys(ids: Sequence[int]) -> list[list[bytes]]:
        """Per view, the Redis keys of the entities (built before timing, as requests are)."""
        encoded = [entity_key([i]) for i in ids]
        return [[f"{DEFAULT_PREFIX}{view.name}:{key}".encode() for key in encoded] for view in data.VIEWS]

    def read(self, keys: list[list[bytes]]) -> tuple[list[list[dict[str, Any] | None]], int]:
        """One pipelined round trip; per view the entities' features (None where Redis has no record) and how
        many values were not records (absent keys, or floors a read would send on to the durable tier)."""
        pipe = self.client.pipeline(transaction=False)
        for view_keys in keys:
            pipe.mget(view_keys)
        out: list[list[dict[str, Any] | None]] = []
        misses = 0
        for values in pipe.execute():
            rows: list[dict[str, Any] | None] = []
            for value in values:
                if value is None or len(value) <= HEAD_BYTES:
                    rows.append(None)
                    misses += 1
                else:
                    rows.append(msgpack.unpackb(value[HEAD_BYTES:], raw=False)["f"])
            out.append(rows)
        return out, misses

    def run(self, warmup: list[list[int]], batches: list[list[int]]) -> Timed:
        """Unrecorded warm-up calls, then one read per batch in order (concurrency 1), each timed alone."""
        for batch in warmup:
            self.read(self.keys(batch))
        prepared = [self.keys(batch) for batch in batches]
        result = Timed(warmup_calls=len(warmup))
        latencies = result.latencies_ms
        clock = time.perf_counter
        misses = 0
        collections = _collections()
        began = clock()
        for keys in prepared:
            start = clock()
            _, missed = self.read(keys)
            latencies.append((clock() - start) * 1000)
            misses += missed
        result.seconds = clock() - began
        result.gc_collections = [after - before for after, before in zip(_collections(), collections, strict=True)]
        result.served_tiers = {"redis": len(batches)}
        result.detail["values_not_records"] = misses
        return result
