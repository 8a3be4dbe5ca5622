"""The value sketches a metric window carries: checked once on arrival, kept as the bytes received (so a retried
window compares equal), and merged per name on demand."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from fresco.api.models.v1 import monitoring_pb2 as mpb
from fresco.monitoring.kll_bytes import kll_problem
from fresco.monitoring.sketches import KLL_K, ColumnSketch, SketchError

MAX_NAME_CHARS = 256  # the monitor store's name column
FEATURE = int(mpb.VALUE_SKETCH_KIND_FEATURE)
SCORE = int(mpb.VALUE_SKETCH_KIND_SCORE)
KIND_NAMES = {FEATURE: "feature", SCORE: "score"}

# (kind, name): a feature and an output may share a name without mixing.
SketchKey = tuple[int, str]


class SketchDecodeError(ValueError):
    """A sketch that cannot be read; the message names the field."""


@dataclass(frozen=True)
class WindowSketch:
    """One feature's or output's sketch in one window, as the checked ValueSketch bytes: windows are kept for hours,
    and the bytes take a fraction of the memory of the decoded sketch (decoded again when merged)."""

    name: str
    kind: int
    data: bytes

    @classmethod
    def of(cls, message: mpb.ValueSketch) -> WindowSketch:
        """A received sketch, checked; SketchDecodeError naming the field when it cannot be read."""
        _decode(message)
        return cls(message.name, int(message.kind), message.SerializeToString(deterministic=True))

    @property
    def sketch(self) -> ColumnSketch:
        """The sketch, decoded anew (the caller owns it)."""
        return ColumnSketch.from_proto(mpb.ValueSketch.FromString(self.data))

    @classmethod
    def from_bytes(cls, data: bytes) -> WindowSketch:
        """A sketch from the bytes `data` kept."""
        message = mpb.ValueSketch()
        try:
            message.ParseFromString(data)
        except DecodeError as err:
            raise SketchDecodeError(f"value_sketch: expected a serialized ValueSketch: {err}") from None
        return cls.of(message)

    @property
    def key(self) -> SketchKey:
        """(kind, name)."""
        return (self.kind, self.name)

    def to_text(self) -> str:
        """The bytes as base64, for JSON."""
        return base64.b64encode(self.data).decode("ascii")

    @classmethod
    def from_text(cls, text: str) -> WindowSketch:
        """The inverse of `to_text`."""
        return cls.from_bytes(base64.b64decode(text.encode("ascii"), validate=True))


def _decode(message: mpb.ValueSketch) -> ColumnSketch:
    """A received sketch, checked; SketchDecodeError naming the field when it cannot be read."""
    if len(message.name) > MAX_NAME_CHARS:
        raise SketchDecodeError(f"name: expected at most {MAX_NAME_CHARS} characters, got {len(message.name)}")
    problem = kll_problem(message.kll_sketch, KLL_K) if message.kll_sketch else None
    if problem is not None:  # checked before the library reads it: malformed bytes crash it on first use
        raise SketchDecodeError(f"kll_sketch: expected a DataSketches kll_doubles_sketch: {problem}")
    try:
        sketch = ColumnSketch.from_proto(message)
    except SketchError as err:
        raise SketchDecodeError(str(err)) from None
    except (IndexError, ValueError, RuntimeError) as err:  # what the library raises for bytes it refuses
        raise SketchDecodeError(f"kll_sketch: expected a DataSketches kll_doubles_sketch: {err}") from None
    return sketch


def decode_sketches(
    messages: Sequence[mpb.ValueSketch], field_name: str = "value_sketches"
) -> tuple[WindowSketch, ...]:
    """A window's sketches, checked: each readable, no (kind, name) twice; ValueError naming the field."""
    out: list[WindowSketch] = []
    seen: set[SketchKey] = set()
    for i, message in enumerate(messages):
        try:
            sketch = WindowSketch.of(message)
        except SketchDecodeError as err:
            raise SketchDecodeError(f"{field_name}[{i}].{err}") from None
        if sketch.key in seen:
            raise SketchDecodeError(f"{field_name}[{i}].name: {sketch.name!r} is listed twice for the same kind")
        seen.add(sketch.key)
        out.append(sketch)
    return tuple(out)


def sketches_to_list(sketches: Iterable[WindowSketch]) -> list[str]:
    """JSON-ready: base64 of each sketch's bytes."""
    return [s.to_text() for s in sketches]


def sketches_from_list(items: Iterable[Any]) -> tuple[WindowSketch, ...]:
    """The inverse of `sketches_to_list`."""
    return tuple(WindowSketch.from_text(str(text)) for text in items)


def merge_sketches(groups: Iterable[Iterable[WindowSketch]]) -> dict[SketchKey, ColumnSketch]:
    """Every sketch of the same (kind, name) merged into a fresh one; the inputs stay as they are."""
    merged: dict[SketchKey, ColumnSketch] = {}
    for group in groups:
        for s in group:
            target = merged.get(s.key)
            if target is None:
                merged[s.key] = s.sketch
            else:
                target.merge(s.sketch)
    return merged


def by_name(merged: Mapping[SketchKey, ColumnSketch], kind: int) -> dict[str, ColumnSketch]:
    """The merged sketches of one kind, by name."""
    return {name: sketch for (k, name), sketch in merged.items() if k == kind}
