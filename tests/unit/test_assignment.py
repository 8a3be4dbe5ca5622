"""The frozen assignment specification: known FNV-1a answers, the committed test vectors, coverage that grows
without reassigning anyone, and splits that follow the weights."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fresco.experiments.assignment import (
    BUCKETS,
    SPEC_VERSION,
    Placement,
    arm_bounds,
    committed_vectors,
    disagreements,
    fnv1a32,
)

VECTORS = Path(__file__).resolve().parents[2] / "fresco" / "experiments" / "assignment_vectors.json"
UNITS = [f"user-{i}" for i in range(20_000)]


def test_fnv1a32_gives_the_published_answers() -> None:
    # The reference values of 32-bit FNV-1a (Fowler, Noll, Vo).
    assert fnv1a32(b"") == 0x811C9DC5
    assert fnv1a32(b"a") == 0xE40C292C
    assert fnv1a32(b"foobar") == 0xBF9CF968


def test_every_committed_vector_is_reproduced() -> None:
    document = json.loads(VECTORS.read_text(encoding="utf-8"))
    assert committed_vectors() == document, "the package ships the committed vectors"
    assert document["spec_version"] == SPEC_VERSION
    assert len(document["buckets"]) + len(document["placements"]) >= 400
    assert disagreements(document) == []
    arms = Counter(v["arm"] for v in document["placements"])
    assert arms[None] > 50, "the vectors cover units left out"
    assert sum(n for arm, n in arms.items() if arm is not None) > 50, "and units placed in an arm"


def test_a_wrong_vector_is_reported() -> None:
    document = committed_vectors()
    document["buckets"][0] = {**document["buckets"][0], "bucket": (document["buckets"][0]["bucket"] + 1) % BUCKETS}
    document["placements"][0] = {**document["placements"][0], "arm": 7}
    assert [line.split(" ")[0] for line in disagreements(document)] == ["bucket", "placement"]


@given(
    unit=st.text(max_size=40),
    low=st.floats(0.0, 1.0),
    high=st.floats(0.0, 1.0),
    weights=st.lists(st.floats(0.0, 100.0), min_size=1, max_size=5).filter(lambda w: sum(w) > 0),
)
def test_growing_coverage_never_moves_a_unit_already_in(
    unit: str, low: float, high: float, weights: list[float]
) -> None:
    low, high = min(low, high), max(low, high)
    before = Placement("exp", tuple(weights), coverage=low).arm(unit)
    after = Placement("exp", tuple(weights), coverage=high).arm(unit)
    if before is not None:
        assert after == before


def test_splits_follow_the_weights_and_coverage_is_independent_of_the_arm() -> None:
    # The units are fixed, so these shares are the same on every run; the bounds only say the hash mixes well.
    split = Counter(Placement("checkout-v2", (90.0, 10.0)).arm(u) for u in UNITS)
    assert abs(split[1] / len(UNITS) - 0.10) < 0.01, split
    half = [Placement("checkout-v2", (50.0, 50.0), coverage=0.5).arm(u) for u in UNITS]
    covered = [a for a in half if a is not None]
    assert abs(len(covered) / len(UNITS) - 0.5) < 0.02
    assert abs(covered.count(1) / len(covered) - 0.5) < 0.02, "the arm hash is not the coverage hash"


def test_namespaces_exclude_each_other() -> None:
    left = Placement("exp-a", (1.0, 1.0), namespace="checkout", namespace_range=(0, 5000))
    right = Placement("exp-b", (1.0, 1.0), namespace="checkout", namespace_range=(5000, BUCKETS))
    both = [u for u in UNITS if left.arm(u) is not None and right.arm(u) is not None]
    neither = [u for u in UNITS if left.arm(u) is None and right.arm(u) is None]
    assert both == []
    assert neither == []


def test_arm_bounds_and_bad_placements() -> None:
    assert arm_bounds([1.0, 1.0, 2.0]) == (2500, 5000, BUCKETS)
    assert arm_bounds([0.0, 1.0]) == (0, BUCKETS)  # a zero-weight arm gets no bucket
    for bad in ([], [-1.0], [0.0, 0.0], [float("nan")]):
        with pytest.raises(ValueError, match="weights"):
            arm_bounds(bad)
    with pytest.raises(ValueError, match="coverage"):
        Placement("exp", (1.0,), coverage=1.5)
    with pytest.raises(ValueError, match="namespace_range"):
        Placement("exp", (1.0,), namespace="ns", namespace_range=(10, 10))
    with pytest.raises(ValueError, match="salt"):
        Placement("", (1.0,))
