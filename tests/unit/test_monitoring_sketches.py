"""Value sketches: classification of raw values, exact merges, the wire form and its checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fresco.api.models.v1 import monitoring_pb2
from fresco.monitoring.sketches import MAX_CATEGORIES, SCORE, ColumnSketch, SketchError


def test_values_are_classified_as_null_invalid_numeric_or_categorical() -> None:
    sketch = ColumnSketch("v:x")
    sketch.add([1.0, None, float("nan"), float("inf"), 2, "a", True, [3.0, 4.0], [], b"b"])
    assert sketch.count == 11  # ten values, the list of two counting twice
    assert sketch.null_count == 3  # None, NaN and the empty list
    assert sketch.invalid_count == 1
    assert sketch.numeric_count() == 4
    assert sorted(sketch.kll.get_quantiles([0.0, 1.0])) == [1.0, 4.0]
    assert sketch.categories == {"a": 1, "true": 1, "b": 1}


def test_a_numeric_batch_takes_the_vectorised_path_and_keeps_exact_quantiles_for_small_counts() -> None:
    sketch = ColumnSketch("v:x")
    sketch.add([5.0, 1.0, 3.0])
    sketch.add_numbers(np.array([2.0, np.nan, -np.inf, 4.0]))
    assert (sketch.count, sketch.null_count, sketch.invalid_count, sketch.numeric_count()) == (7, 1, 1, 5)
    assert sketch.kll.get_quantiles([0.0, 0.5, 1.0]) == [1.0, 3.0, 5.0]


def test_text_and_booleans_are_counted_per_category() -> None:
    sketch = ColumnSketch("v:c")
    sketch.add(["x", "y", "x"])
    sketch.add([True, False, True])
    assert sketch.categories == {"x": 2, "y": 1, "true": 2, "false": 1}
    assert sketch.count == 6
    assert sketch.kll.is_empty()


def test_numbers_among_text_stay_numbers_and_empty_lists_are_nulls() -> None:
    sketch = ColumnSketch("v:x")
    sketch.add(["n/a", 1.5, 2.5, True])
    assert sketch.numeric_count() == 2
    assert sketch.categories == {"n/a": 1, "true": 1}
    empty = ColumnSketch("v:l")
    empty.add([[], []])
    assert (empty.count, empty.null_count) == (2, 2)


def test_a_batch_of_one_boolean_value_lists_no_empty_category() -> None:
    sketch = ColumnSketch("v:b")
    sketch.add([True, True])
    assert sketch.categories == {"true": 2}
    assert ColumnSketch.from_proto(sketch.to_proto()).categories == {"true": 2}


def test_merging_is_the_sketch_of_all_values() -> None:
    rng = np.random.default_rng(3)
    values = rng.normal(size=3000)
    whole, first, second = ColumnSketch("v:x"), ColumnSketch("v:x"), ColumnSketch("v:x")
    whole.add_numbers(values)
    first.add_numbers(values[:1000])
    second.add_numbers(values[1000:])
    first.merge(second)
    assert (first.count, first.numeric_count()) == (3000, 3000)
    # Both are within the KLL rank error of the true median.
    for sketch in (first, whole):
        assert abs(np.mean(values <= sketch.kll.get_quantile(0.5)) - 0.5) < 0.02
    with pytest.raises(ValueError, match="cannot merge"):
        first.merge(ColumnSketch("v:y"))


def test_the_wire_form_round_trips_and_caps_categories() -> None:
    sketch = ColumnSketch("score", SCORE)
    sketch.add([f"c{i}" for i in range(MAX_CATEGORIES + 10)] + ["c0"] * 5)
    sketch.add([0.5, None, float("inf")])
    message = sketch.to_proto()
    assert len(message.categories) == MAX_CATEGORIES
    assert message.categories[0].value == "c0"
    assert message.categories[0].count == 6
    assert message.other_category_count == 10
    back = ColumnSketch.from_proto(message)
    count = MAX_CATEGORIES + 10 + 5 + 3
    assert (back.name, back.kind, back.count, back.null_count, back.invalid_count) == ("score", SCORE, count, 1, 1)
    assert back.kll.get_quantile(0.5) == 0.5
    assert back.categorical_count() == sketch.categorical_count()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": ""}, "name"),
        ({"kind": 7}, "kind"),
        ({"null_count": -1}, "null_count"),
        ({"count": 99}, "count"),
        ({"kll_sketch": b"not a sketch"}, "kll_sketch"),
    ],
)
def test_a_bad_sketch_is_refused_naming_the_field(change: dict[str, object], field: str) -> None:
    sketch = ColumnSketch("v:x")
    sketch.add([1.0, 2.0, None])
    message = sketch.to_proto()
    for key, value in change.items():
        setattr(message, key, value)
    with pytest.raises(SketchError, match=f"^{field}:"):
        ColumnSketch.from_proto(message)


def test_repeated_or_empty_category_counts_are_refused() -> None:
    message = monitoring_pb2.ValueSketch(name="v:c", kind=monitoring_pb2.VALUE_SKETCH_KIND_FEATURE, count=2)
    message.categories.add(value="a", count=1)
    message.categories.add(value="a", count=1)
    with pytest.raises(SketchError, match=r"categories\[1\]\.value"):
        ColumnSketch.from_proto(message)
    del message.categories[1]
    message.categories.add(value="b", count=0)
    with pytest.raises(SketchError, match=r"categories\[1\]\.count"):
        ColumnSketch.from_proto(message)


@settings(derandomize=True, max_examples=200, deadline=None)
@given(
    st.binary(max_size=64),
    st.integers(min_value=-5, max_value=2**40),
    st.integers(min_value=-5, max_value=5),
    st.lists(st.tuples(st.text(max_size=3), st.integers(min_value=-2, max_value=5)), max_size=4),
)
def test_fuzzed_sketches_are_read_or_refused_with_a_sketch_error(
    kll: bytes, count: int, nulls: int, categories: list[tuple[str, int]]
) -> None:
    message = monitoring_pb2.ValueSketch(
        name="f", kind=monitoring_pb2.VALUE_SKETCH_KIND_FEATURE, count=count, null_count=nulls, kll_sketch=kll
    )
    for value, n in categories:
        message.categories.add(value=value, count=n)
    try:
        sketch = ColumnSketch.from_proto(message)
    except SketchError:
        return
    parts = sketch.null_count + sketch.invalid_count + sketch.numeric_count() + sketch.categorical_count()
    assert parts == sketch.count >= 0
    assert sketch.kll.is_empty() or math.isfinite(sketch.kll.get_max_value())
