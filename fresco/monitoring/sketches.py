"""Streaming summaries of one feature's or output's values: counts of nulls and of values no distribution can hold,
an Apache DataSketches KLL quantile sketch of the finite numbers, and category counts. Summaries of the same name
merge exactly (counts add, KLL sketches merge), so gateways sketch per window and the model manager merges windows
and gateways. Work is per batch: one numpy conversion and one KLL update per call, never one per value."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Final

import datasketches
import numpy as np

from fresco.api.models.v1 import monitoring_pb2
from fresco.monitoring.kll_bytes import kll_problem

KLL_K: Final = 200  # rank error about 1.3% (99% confidence); serialized size stays under about 5 KB
MAX_CATEGORIES: Final = 1024  # categories shipped per sketch (drift bins use training's top ones); the rest: "other"
FEATURE: Final = monitoring_pb2.VALUE_SKETCH_KIND_FEATURE
SCORE: Final = monitoring_pb2.VALUE_SKETCH_KIND_SCORE


class SketchError(ValueError):
    """A ValueSketch that cannot be read; the message names the field and what was expected."""


def new_kll() -> datasketches.kll_doubles_sketch:
    """An empty KLL sketch of the platform's accuracy."""
    return datasketches.kll_doubles_sketch(KLL_K)


def category_of(value: object) -> str:
    """How a categorical value is counted: booleans as "true"/"false", bytes decoded, text as is."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class ColumnSketch:
    """The values of one feature or output seen so far."""

    __slots__ = ("categories", "count", "invalid_count", "kind", "kll", "name", "null_count", "other_categories")

    def __init__(self, name: str, kind: int = FEATURE) -> None:
        self.name = name
        self.kind = kind
        self.count = 0
        self.null_count = 0
        self.invalid_count = 0
        self.kll = new_kll()
        self.categories: Counter[str] = Counter()
        self.other_categories = 0

    def numeric_count(self) -> int:
        """The finite numbers held by the KLL sketch."""
        return int(self.kll.n)

    def categorical_count(self) -> int:
        """The categorical values counted, listed or not."""
        return sum(self.categories.values()) + self.other_categories

    def add_numbers(self, values: np.ndarray) -> None:
        """A batch of numbers: NaN is null, an infinity is invalid, the finite rest goes into the KLL sketch."""
        flat = np.asarray(values, dtype=np.float64).ravel()
        finite = np.isfinite(flat)
        nulls = int(np.isnan(flat).sum())
        self.count += flat.size
        self.null_count += nulls
        self.invalid_count += flat.size - nulls - int(finite.sum())
        if finite.all():
            self.kll.update(flat)
        elif finite.any():
            self.kll.update(flat[finite])

    def add(self, values: Sequence[object] | np.ndarray) -> None:
        """A batch of raw values: None and NaN are null; numbers are sketched (infinities invalid); text, bytes and
        booleans are categories; a list contributes each of its elements (an empty list is null)."""
        if len(values) == 0:
            return
        try:
            array = np.asarray(values)
        except ValueError:  # lists of different lengths
            self._add_mixed(values)
            return
        kind = array.dtype.kind
        if array.size == 0 or (kind in "US" and not all(isinstance(v, str | bytes) for v in values)):
            self._add_mixed(values)  # empty lists (nulls), or numbers and booleans numpy turned into text
        elif kind in "fiu":
            self.add_numbers(array.astype(np.float64, copy=False))
        elif kind in "US":
            self._add_categories(array.ravel())
        elif kind == "b":
            self.count += array.size
            trues = int(array.sum())
            self.categories.update({name: n for name, n in (("true", trues), ("false", array.size - trues)) if n})
        else:
            self._add_mixed(values)

    def _add_categories(self, array: np.ndarray) -> None:
        labels, counts = np.unique(array, return_counts=True)
        self.count += int(counts.sum())
        self.categories.update({category_of(label): int(n) for label, n in zip(labels.tolist(), counts, strict=True)})

    def _add_mixed(self, values: Iterable[object]) -> None:
        # Mixed batches (nulls among numbers, lists, text among numbers): classify each value once, then sketch the
        # numbers in one call.
        numbers: list[float] = []
        for value in values:
            if isinstance(value, list | tuple | np.ndarray):
                if len(value) == 0:
                    self.count += 1
                    self.null_count += 1
                else:
                    self._add_mixed(value)
                continue
            if value is None:
                self.count += 1
                self.null_count += 1
            elif isinstance(value, bool | str | bytes | np.str_ | np.bool_):
                self.count += 1
                self.categories[category_of(bool(value) if isinstance(value, np.bool_) else value)] += 1
            elif isinstance(value, int | float | np.integer | np.floating):
                numbers.append(float(value))
            else:  # anything else has no place in a distribution
                self.count += 1
                self.invalid_count += 1
        if numbers:
            self.add_numbers(np.asarray(numbers, dtype=np.float64))

    def merge(self, other: ColumnSketch) -> None:
        """Add another sketch of the same name into this one."""
        if other.name != self.name:
            raise ValueError(f"cannot merge the sketch of {other.name!r} into the sketch of {self.name!r}")
        self.count += other.count
        self.null_count += other.null_count
        self.invalid_count += other.invalid_count
        if not other.kll.is_empty():
            self.kll.merge(other.kll)
        self.categories.update(other.categories)
        self.other_categories += other.other_categories

    def copy(self) -> ColumnSketch:
        """An independent copy."""
        twin = ColumnSketch(self.name, self.kind)
        twin.merge(self)
        return twin

    def _listed(self, limit: int) -> tuple[list[tuple[str, int]], int]:
        """The `limit` most frequent categories, and the count of every other categorical value."""
        listed = self.categories.most_common(limit)
        return listed, self.other_categories + self.categories.total() - sum(n for _, n in listed)

    def fold_categories(self, limit: int) -> None:
        """Keep only the `limit` most frequent categories, the rest counted as other: bounds memory when a text
        value is new at every request."""
        if len(self.categories) > limit:
            listed, self.other_categories = self._listed(limit)
            self.categories = Counter(dict(listed))

    def to_proto(self) -> monitoring_pb2.ValueSketch:
        """The wire form: the MAX_CATEGORIES most frequent categories listed, the rest counted as other."""
        listed, other = self._listed(MAX_CATEGORIES)
        return monitoring_pb2.ValueSketch(
            name=self.name,
            kind=self.kind,  # type: ignore[arg-type]
            count=self.count,
            null_count=self.null_count,
            invalid_count=self.invalid_count,
            kll_sketch=b"" if self.kll.is_empty() else self.kll.serialize(),
            categories=[monitoring_pb2.CategoryTally(value=value, count=n) for value, n in listed],
            other_category_count=other,
        )

    @classmethod
    def from_proto(cls, message: monitoring_pb2.ValueSketch) -> ColumnSketch:
        """A received sketch, checked: every count non-negative and the parts adding up to `count`."""
        if not message.name:
            raise SketchError("name: expected the feature ref or output name, got an empty string")
        if message.kind not in (FEATURE, SCORE):
            raise SketchError(f"kind: expected VALUE_SKETCH_KIND_FEATURE or _SCORE, got {message.kind}")
        for field in ("count", "null_count", "invalid_count", "other_category_count"):
            if getattr(message, field) < 0:
                raise SketchError(f"{field}: expected a non-negative count, got {getattr(message, field)}")
        sketch = cls(message.name, message.kind)
        if message.kll_sketch:
            if (problem := kll_problem(message.kll_sketch, KLL_K)) is not None:
                raise SketchError(f"kll_sketch: {problem}")  # checked first: corrupt bytes can crash the library
            try:
                sketch.kll = datasketches.kll_doubles_sketch.deserialize(message.kll_sketch)
            except (ValueError, RuntimeError, IndexError, MemoryError) as err:  # the library's corruption errors
                raise SketchError(f"kll_sketch: expected a DataSketches kll_doubles_sketch: {err}") from None
            if sketch.kll.k != KLL_K:
                raise SketchError(f"kll_sketch: expected k={KLL_K}, got k={sketch.kll.k}")
            if not sketch.kll.is_empty() and not all(
                math.isfinite(v) for v in (sketch.kll.get_min_value(), sketch.kll.get_max_value())
            ):
                raise SketchError("kll_sketch: expected finite values only (infinities are counted as invalid)")
        for i, tally in enumerate(message.categories):
            if tally.count <= 0:
                raise SketchError(f"categories[{i}].count: expected a positive count, got {tally.count}")
            if tally.value in sketch.categories:
                raise SketchError(f"categories[{i}].value: {tally.value!r} is listed twice")
            sketch.categories[tally.value] = tally.count
        sketch.count = message.count
        sketch.null_count = message.null_count
        sketch.invalid_count = message.invalid_count
        sketch.other_categories = message.other_category_count
        parts = sketch.null_count + sketch.invalid_count + sketch.numeric_count() + sketch.categorical_count()
        if parts != sketch.count:
            raise SketchError(
                f"count: expected null_count + invalid_count + the KLL sketch's n + the category counts = {parts}, "
                f"got {sketch.count}"
            )
        return sketch
