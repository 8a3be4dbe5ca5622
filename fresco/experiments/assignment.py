"""The frozen assignment specification: which arm of an experiment a unit gets, the same in every language.

Version 1 of the specification (every implementation reproduces `fresco/experiments/assignment_vectors.json`):

- **Bucket.** `bucket(seed, unit) = fnv1a32(decimal(fnv1a32(utf8(seed + unit)))) mod 10000`, GrowthBook's v2 hash:
  32-bit FNV-1a (offset basis 2166136261, prime 16777619) over the UTF-8 bytes of seed and unit joined with no
  separator, the result written in decimal ASCII, hashed again, reduced mod 10000. Buckets are integers 0..9999.
- **Independent seeds.** Each decision hashes with its own seed, so no hash is reused for two purposes:
  `"ns:" + namespace_id` for mutual exclusion, `"cov:" + salt` for coverage and `"arm:" + salt` for the arm
  (the salt defaults to the experiment key).
- **Namespace.** A unit is in the experiment's slice of a namespace when `start <= bucket("ns:…") < end`.
- **Coverage.** A unit enters when `bucket("cov:…") < round(coverage * 10000)`: the range starts at 0 whatever the
  coverage, so growing coverage only adds units and never moves one already in.
- **Arm.** Arms own consecutive ranges of `bucket("arm:…")` from 0, arm i ending at `round(10000 * w_0..i / W)`
  (cumulative weight over total weight), in the experiment's arm order. Changing weights moves units between arms:
  that starts a new phase of the experiment. Coverage never does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

BUCKETS = 10_000
SPEC_VERSION = 1
_FNV_OFFSET = 2_166_136_261
_FNV_PRIME = 16_777_619
_MASK32 = 0xFFFF_FFFF


def fnv1a32(data: bytes) -> int:
    """32-bit FNV-1a of `data`."""
    value = _FNV_OFFSET
    for byte in data:
        value = ((value ^ byte) * _FNV_PRIME) & _MASK32
    return value


def bucket(seed: str, unit: str) -> int:
    """The unit's bucket in 0..9999 for one seed (GrowthBook's v2 hash: FNV-1a twice, the first in decimal)."""
    first = fnv1a32((seed + unit).encode("utf-8"))
    return fnv1a32(str(first).encode("ascii")) % BUCKETS


def arm_bounds(weights: Sequence[float]) -> tuple[int, ...]:
    """Where each arm's bucket range ends: cumulative weights over the total, rounded, the last one 10000."""
    if not weights:
        raise ValueError("weights: expected at least one arm")
    if any(not w >= 0.0 for w in weights):
        raise ValueError(f"weights: expected non-negative numbers, got {list(weights)}")
    total = sum(weights)
    if not total > 0.0:
        raise ValueError("weights: expected a positive total")
    bounds, running = [], 0.0
    for w in weights:
        running += w
        bounds.append(round(BUCKETS * running / total))
    bounds[-1] = BUCKETS
    return tuple(bounds)


@dataclass(frozen=True)
class Placement:
    """How an experiment places units: its salt, namespace slice, coverage and arm weights."""

    salt: str
    weights: tuple[float, ...]
    coverage: float = 1.0
    namespace: str = ""
    namespace_range: tuple[int, int] = (0, BUCKETS)

    def __post_init__(self) -> None:
        if not self.salt:
            raise ValueError("salt: expected a non-empty salt (the experiment key by default)")
        if not 0.0 <= self.coverage <= 1.0:
            raise ValueError(f"coverage: expected a fraction in [0, 1], got {self.coverage}")
        start, end = self.namespace_range
        if not 0 <= start < end <= BUCKETS:
            raise ValueError(f"namespace_range: expected 0 <= start < end <= {BUCKETS}, got {self.namespace_range}")
        arm_bounds(self.weights)  # checks the weights

    def arm(self, unit: str) -> int | None:
        """The index of the unit's arm, or None when the unit is outside the namespace slice or the coverage."""
        if self.namespace:
            start, end = self.namespace_range
            if not start <= bucket("ns:" + self.namespace, unit) < end:
                return None
        if bucket("cov:" + self.salt, unit) >= round(self.coverage * BUCKETS):
            return None
        position = bucket("arm:" + self.salt, unit)
        return next(i for i, end in enumerate(arm_bounds(self.weights)) if position < end)


def committed_vectors() -> dict[str, Any]:
    """The specification's test vectors, `assignment_vectors.json`, shipped in this package."""
    text = resources.files("fresco.experiments").joinpath("assignment_vectors.json").read_text(encoding="utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


def disagreements(document: Mapping[str, Any]) -> list[str]:
    """Every entry of a test-vector document this implementation does not reproduce (none, for a correct one)."""
    wrong = [] if document["spec_version"] == SPEC_VERSION else [f"spec_version {document['spec_version']}"]
    wrong += [f"fnv1a32 {v}" for v in document["fnv1a32"] if fnv1a32(v["input"].encode("utf-8")) != v["fnv1a32"]]
    wrong += [f"bucket {v}" for v in document["buckets"] if bucket(v["seed"], v["unit"]) != v["bucket"]]
    for v in document["placements"]:
        placement = Placement(
            v["salt"], tuple(v["weights"]), v["coverage"], v["namespace"], tuple(v["namespace_range"])
        )
        if placement.arm(v["unit"]) != v["arm"]:
            wrong.append(f"placement {v}")
    return wrong
