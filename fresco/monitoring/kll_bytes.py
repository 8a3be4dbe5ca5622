"""A structural check of serialized DataSketches kll_doubles_sketch bytes before they are deserialized.

The library's deserializer checks the header and the total size but not the level boundaries, the item count
against n, or the items themselves: bytes that pass it but were corrupted (or forged) crash the process on the
first query or merge (measured: a segmentation fault). So bytes from another process are checked here first."""

from __future__ import annotations

import itertools
import struct
from typing import Final

import numpy as np

_FAMILY: Final = 15  # KLL
_M: Final = 8  # the library's only minimum level width
_EMPTY: Final = 1  # flag bits
_SINGLE: Final = 4
_SHORT: Final = 2  # preamble ints of an empty or single-item sketch
_FULL: Final = 5
_MAX_LEVELS: Final = 61  # a uint64 n cannot fill more levels


def kll_problem(data: bytes, k: int) -> str | None:
    """What is wrong with `data` as a kll_doubles_sketch of parameter `k`, or None when it is well formed."""
    if len(data) < 8:
        return f"expected at least 8 bytes, got {len(data)}"
    preamble, version, family, flags, sketch_k, m = struct.unpack_from("<BBBBHB", data)
    if family != _FAMILY:
        return f"expected a KLL sketch (family {_FAMILY}), got family {family}"
    if version not in (1, 2) or m != _M:
        return f"expected serial version 1 or 2 with m={_M}, got version {version}, m={m}"
    if sketch_k != k:
        return f"expected k={k}, got k={sketch_k}"
    if flags & _EMPTY:
        return None if preamble == _SHORT and len(data) == 8 else "an empty sketch must be 8 bytes with 2 preamble ints"
    if flags & _SINGLE:
        if preamble != _SHORT or len(data) != 16:
            return "a single-item sketch must be 16 bytes with 2 preamble ints"
        return None if np.isfinite(np.frombuffer(data, "<f8", 1, 8)).all() else "expected a finite item"
    if preamble != _FULL or len(data) < 20:
        return "expected 5 preamble ints and at least 20 bytes"
    n, min_k, levels_count = struct.unpack_from("<QHB", data, 8)
    if not 1 <= levels_count <= _MAX_LEVELS or not _M <= min_k <= k:
        return f"expected 1 to {_MAX_LEVELS} levels and {_M} <= min_k <= k, got {levels_count} levels, min_k={min_k}"
    start = 20 + 4 * levels_count
    items_bytes = len(data) - start - 16  # after the levels come min and max, then the items
    if items_bytes < 8 or items_bytes % 8:
        return "expected min, max and whole items after the levels"
    levels = list(struct.unpack_from(f"<{levels_count}I", data, 20))
    capacity = levels[0] + items_bytes // 8
    levels.append(capacity)
    if any(a > b for a, b in itertools.pairwise(levels)):
        return "expected ascending level boundaries within the capacity"
    weight = sum((levels[i + 1] - levels[i]) << i for i in range(levels_count))
    if weight != n:
        return f"expected the items' weights to add up to n={n}, got {weight}"
    values = np.frombuffer(data, "<f8", offset=start)
    if not np.isfinite(values).all():
        return "expected finite min, max and items"
    low, high, items = values[0], values[1], values[2:]
    if items.size and (items.min() < low or items.max() > high):
        return "expected every item between min and max"
    return None
