"""Bad value sketches are refused naming the field, never crash the manager: corrupted KLL bytes (which the library
would accept and then crash on), inconsistent counts, and arbitrary fields (hypothesis, derandomized)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fresco.api.models.v1 import monitoring_pb2 as mpb
from fresco.monitoring.kll_bytes import kll_problem
from fresco.monitoring.sketches import KLL_K, ColumnSketch
from model_manager.window_codec import decode_window
from model_manager.window_sketches import SketchDecodeError, WindowSketch
from model_manager.windows import LATENCY_BOUNDS_MS, WindowError
from tests.model_manager.monitor_support import message, sketch


def _good() -> list[bytes]:
    out = []
    for n in (1, 150, 5000):
        s = ColumnSketch("x")
        s.add_numbers(np.random.default_rng(n).normal(size=n))
        out.append(s.kll.serialize())
    return out


GOOD = _good()


def _usable(s: ColumnSketch) -> None:
    """Every use drift makes of a sketch, on one that was accepted."""
    twin = s.copy()
    twin.merge(s)
    if not twin.kll.is_empty():
        twin.kll.get_quantiles([0.1, 0.5, 0.9])
        twin.kll.get_pmf([-1.0, 0.0, 1.0])
        list(twin.kll)


@settings(max_examples=400, deadline=None)
@given(
    base=st.sampled_from(range(len(GOOD))),
    cut=st.integers(0, 5000),
    flips=st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 255)), max_size=4),
)
def test_corrupted_kll_bytes_are_refused_or_safe_to_use(base: int, cut: int, flips: list[tuple[int, int]]) -> None:
    data = bytearray(GOOD[base])
    for at, value in flips:
        data[at % len(data)] = value
    data = data[: max(cut, 1)] if cut < len(data) else data
    kll = ColumnSketch("x").to_proto()
    kll.kll_sketch = bytes(data)
    kll.count = 10**9  # the count check comes after the bytes are read: any count does here
    refused = ""
    try:
        WindowSketch.of(kll)
    except SketchDecodeError as err:
        refused = str(err)
    assert not refused or refused.startswith(("kll_sketch:", "count:")), refused
    if kll_problem(bytes(data), KLL_K) is None:
        try:
            s = ColumnSketch.from_proto(mpb.ValueSketch(name="x", kind=1, kll_sketch=bytes(data), count=0))
        except (ValueError, IndexError, RuntimeError):
            return
        _usable(s)


names = st.text(max_size=300)
counts = st.integers(-3, 10**6)


@settings(max_examples=300, deadline=None)
@given(
    name=names,
    kind=st.integers(0, 4),
    count=counts,
    nulls=counts,
    invalid=counts,
    other=counts,
    categories=st.lists(st.tuples(st.text(max_size=5), st.integers(-2, 50)), max_size=4),
    kll=st.sampled_from([b"", GOOD[0], GOOD[1], b"\x05\x01\x0f"]),
)
def test_arbitrary_sketch_fields_are_accepted_consistent_or_refused_naming_the_field(
    name: str,
    kind: int,
    count: int,
    nulls: int,
    invalid: int,
    other: int,
    categories: list[tuple[str, int]],
    kll: bytes,
) -> None:
    s = mpb.ValueSketch(
        name=name,
        kind=kind,  # type: ignore[arg-type]
        count=count,
        null_count=nulls,
        invalid_count=invalid,
        other_category_count=other,
        kll_sketch=kll,
        categories=[mpb.CategoryTally(value=v, count=c) for v, c in categories],
    )
    w = message("churn", 1, [s], end=time.time())
    try:
        window = decode_window(w, "gw", LATENCY_BOUNDS_MS)
    except WindowError as err:
        refused = str(err)
    else:
        refused = ""
    if refused:
        assert refused.startswith("value_sketches[0]."), refused
        return
    (decoded,) = window.sketches
    parts = decoded.sketch.null_count + decoded.sketch.invalid_count + decoded.sketch.numeric_count()
    assert parts + decoded.sketch.categorical_count() == decoded.sketch.count
    _usable(decoded.sketch)


def test_a_feature_listed_twice_is_refused_naming_the_field() -> None:
    w = message("churn", 1, [sketch("a", [1.0]), sketch("a", [2.0])], end=time.time())
    with pytest.raises(WindowError, match=r"value_sketches\[1\]\.name: 'a' is listed twice"):
        decode_window(w, "gw", LATENCY_BOUNDS_MS)
