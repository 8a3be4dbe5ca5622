"""Bloom filters of the keys each view holds, so reads of never-written entities skip Redis and the durable tier.

A filter may only say "absent" for a view when it is complete: built from the durable tier's keys while
this replica was subscribed to other replicas' writes, and fed every write since. Otherwise it is untrusted."""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import AsyncIterable, Iterable, Sequence

import numpy as np

_PAIR = struct.Struct("<QQ")
_BLAKE2B = hashlib.blake2b
_VECTOR_MIN = 16  # below this many keys, a Python loop beats numpy's per-call overhead


class _Layer:
    """One fixed-size filter: m bits, k probes by double hashing (Kirsch-Mitzenmacher) of one blake2b digest."""

    def __init__(self, capacity: int, error_rate: float) -> None:
        self.capacity = capacity
        self.m = max(64, math.ceil(-capacity * math.log(error_rate) / math.log(2) ** 2))
        self.k = max(1, round(self.m / capacity * math.log(2)))
        self.bits = bytearray((self.m + 7) // 8)
        self.array = np.frombuffer(self.bits, dtype=np.uint8)  # a view of the same memory, for batches
        self.count = 0

    def add(self, key: str) -> None:
        h1, h2 = _PAIR.unpack(_BLAKE2B(key.encode(), digest_size=16).digest())
        m, bits = self.m, self.bits
        index, step = h1 % m, h2 % m or 1
        for _ in range(self.k):
            bits[index >> 3] |= 1 << (index & 7)
            index += step
            if index >= m:
                index -= m
        self.count += 1

    def __contains__(self, key: str) -> bool:
        h1, h2 = _PAIR.unpack(_BLAKE2B(key.encode(), digest_size=16).digest())
        m, bits = self.m, self.bits
        index, step = h1 % m, h2 % m or 1
        for _ in range(self.k):
            if not (bits[index >> 3] >> (index & 7)) & 1:
                return False
            index += step
            if index >= m:
                index -= m
        return True

    def _indices(self, digests: bytes) -> np.ndarray:
        pairs = np.frombuffer(digests, dtype="<u8").reshape(-1, 2)
        m = np.uint64(self.m)
        h1 = pairs[:, 0] % m
        h2 = pairs[:, 1] % m
        h2[h2 == 0] = 1
        # The same probes as the scalar path: (h1 + i*h2) mod m, which stays far below 2**64 for any real m.
        steps = np.arange(self.k, dtype=np.uint64)
        indices: np.ndarray = (h1[:, None] + steps[None, :] * h2[:, None]) % m
        return indices

    def add_digests(self, digests: bytes) -> None:
        indices = self._indices(digests).ravel()
        masks = np.left_shift(np.uint8(1), (indices & np.uint64(7)).astype(np.uint8))
        np.bitwise_or.at(self.array, indices >> np.uint64(3), masks)
        self.count += len(digests) // 16

    def contains_digests(self, digests: bytes) -> np.ndarray:
        indices = self._indices(digests)
        bits = (self.array[indices >> np.uint64(3)] >> (indices & np.uint64(7)).astype(np.uint8)) & 1
        found: np.ndarray = bits.all(axis=1)
        return found


def _digests(keys: Iterable[str]) -> bytes:
    return b"".join([_BLAKE2B(key.encode(), digest_size=16).digest() for key in keys])


class BloomFilter:
    """A set with false positives but no false negatives, within error_rate up to capacity keys.

    Past capacity it grows a layer at a time (twice as large, half the error rate each), so its error stays
    under 2 × error_rate however many keys are added, instead of creeping towards 1."""

    def __init__(self, capacity: int = 1_000_000, error_rate: float = 0.01) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        if not 0 < error_rate < 1:
            raise ValueError(f"error_rate must be between 0 and 1, got {error_rate}")
        self.capacity = capacity
        self.error_rate = error_rate
        self._layers = [_Layer(capacity, error_rate)]

    def __len__(self) -> int:
        """Keys added (a key added twice counts twice)."""
        return sum(layer.count for layer in self._layers)

    @property
    def size_bytes(self) -> int:
        return sum(len(layer.bits) for layer in self._layers)

    def _open_layer(self) -> _Layer:
        layer = self._layers[-1]
        if layer.count >= layer.capacity:
            layer = _Layer(layer.capacity * 2, self.error_rate / 2 ** len(self._layers))
            self._layers.append(layer)
        return layer

    def add(self, key: str) -> None:
        self._open_layer().add(key)

    def add_many(self, keys: Sequence[str]) -> None:
        """Add keys; a long batch is hashed into numpy in one go."""
        if len(keys) < _VECTOR_MIN:
            for key in keys:
                self.add(key)
            return
        start = 0
        while start < len(keys):
            layer = self._open_layer()
            end = min(len(keys), start + max(1, layer.capacity - layer.count))
            layer.add_digests(_digests(keys[start:end]))
            start = end

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        return any(key in layer for layer in self._layers)

    def might_contain_many(self, keys: Sequence[str]) -> list[bool]:
        """Per key, False when it was certainly never added."""
        if len(keys) < _VECTOR_MIN:
            return [any(key in layer for layer in self._layers) for key in keys]
        digests = _digests(keys)
        found = self._layers[0].contains_digests(digests)
        for layer in self._layers[1:]:
            found |= layer.contains_digests(digests)
        result: list[bool] = found.tolist()
        return result


class BloomFilters:
    """One filter per view, each trusted or not: only a trusted filter may answer "absent"."""

    def __init__(self, capacity: int = 1_000_000, error_rate: float = 0.01) -> None:
        self.capacity = capacity
        self.error_rate = error_rate
        self._filters: dict[str, BloomFilter] = {}
        self._trusted: set[str] = set()
        self._building: dict[str, list[BloomFilter]] = {}
        self._epochs: dict[str, int] = {}

    def views(self) -> list[str]:
        """Views with a filter, trusted or not."""
        return list(self._filters)

    def trusted(self, view: str) -> bool:
        return view in self._trusted

    def get(self, view: str) -> BloomFilter | None:
        return self._filters.get(view)

    def might_contain_many(self, view: str, keys: Sequence[str]) -> list[bool] | None:
        """Per key, False when certainly absent; None when the view's filter is missing or untrusted."""
        if view not in self._trusted:
            return None
        return self._filters[view].might_contain_many(keys)

    def add(self, view: str, keys: Sequence[str]) -> None:
        """Record written keys in the view's filter and in any being rebuilt, so none is missed by either."""
        current = self._filters.get(view)
        if current is not None:
            current.add_many(keys)
        for building in self._building.get(view, ()):
            building.add_many(keys)

    def mark_untrusted(self, views: Iterable[str] | None = None) -> None:
        """Stop trusting filters (all when views is None), including rebuilds under way: they may miss writes."""
        chosen = set(self._epochs) | set(self._filters) if views is None else set(views)
        for view in chosen:
            self._epochs[view] = self._epochs.get(view, 0) + 1
            self._trusted.discard(view)

    async def rebuild(self, view: str, keys: AsyncIterable[str], *, trust: bool = True, batch: int = 4096) -> int:
        """Build a view's filter from all its stored keys and swap it in; trusted if `trust` and nothing
        untrusted the view meanwhile. The number of keys read."""
        epoch = self._epochs.setdefault(view, 0)
        previous = self._filters.get(view)
        # Sized from what the last filter held, so a view that grew needs no extra layers.
        capacity = max(self.capacity, int(len(previous) * 1.5) if previous is not None else 0)
        fresh = BloomFilter(capacity, self.error_rate)
        self._building.setdefault(view, []).append(fresh)
        count = 0
        try:
            pending: list[str] = []
            async for key in keys:
                pending.append(key)
                if len(pending) >= batch:
                    fresh.add_many(pending)
                    count += len(pending)
                    pending = []
            fresh.add_many(pending)
            count += len(pending)
        finally:
            self._building[view].remove(fresh)
            if not self._building[view]:
                del self._building[view]
        self._filters[view] = fresh
        if trust and self._epochs[view] == epoch:
            self._trusted.add(view)
        else:
            self._trusted.discard(view)
        return count
