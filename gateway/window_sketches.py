"""The value sketches and prediction records of one metrics window. The request path hands over only
what it already holds (the input arrays a version was called with, one score per row); arrays wait
per input until a block of rows is reached, then feed `ColumnSketch` one vectorised call per
feature, so per-value work is numpy's and the KLL sketch's, never a Python loop over numbers."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from fresco.api.models.v1 import routing_pb2
from fresco.monitoring.sketches import FEATURE, MAX_CATEGORIES, SCORE, ColumnSketch, category_of
from gateway.assembly import InputSpec, ModelSignature

BLOCK_ROWS: Final = 1024  # rows buffered per input (or score output) before they are sketched
# An input whose features are not named and which holds more values per row than this (an image, an embedding, a
# long list of text) is not sketched: one distribution of all its values says little, and it would cost per value.
MAX_UNNAMED_VALUES_PER_ROW: Final = 256
# Distinct categories held per sketch before the rarest are folded into "other": bounds memory when a
# text feature takes a new value per request; the MAX_CATEGORIES shipped per window are within it.
KEPT_CATEGORIES: Final = 2 * MAX_CATEGORIES

Record = tuple[str, int, float, str]  # (request id, time ns, score, unit id)


@dataclass(frozen=True)
class Called:
    """The input tensors a version answered, with the signature they were built from."""

    signature: ModelSignature
    inputs: Mapping[str, np.ndarray]


@dataclass
class _Pending:
    """Arrays of one input waiting to be sketched."""

    spec: InputSpec
    blocks: list[np.ndarray] = field(default_factory=list)
    rows: int = 0


def _columns(spec: InputSpec, blocks: list[np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """(feature name, values) of an input's blocks: one column per named feature, else the whole input."""
    if spec.feature_names:
        width = len(spec.feature_names)
        tables = [block.reshape(len(block), -1) for block in blocks]
        if all(table.shape[1] == width for table in tables):
            table = tables[0] if len(tables) == 1 else np.concatenate(tables)
            if table.dtype.kind in "fiu" and spec.datatype != "BF16":  # one conversion: each column contiguous
                table = np.ascontiguousarray(table.T, dtype=np.float64).T
            return list(zip(spec.feature_names, table.T, strict=True))
    return [(spec.name, np.concatenate([block.reshape(-1) for block in blocks]))]


def _sketch_values(sketch: ColumnSketch, values: np.ndarray, datatype: str) -> None:
    """One column into its sketch, read as its tensor datatype says."""
    if datatype == "BYTES":  # text: categories (bytes read as UTF-8)
        sketch.add([category_of(v) for v in values.tolist()])
        if len(sketch.categories) > KEPT_CATEGORIES:
            sketch.fold_categories(KEPT_CATEGORIES // 2)
    elif datatype == "BOOL":  # counted as "true"/"false" categories
        sketch.add(values)
    elif datatype == "BF16":  # raw bfloat16 words are the high half of a float32
        sketch.add_numbers((values.astype(np.uint32) << 16).view(np.float32).astype(np.float64))
    else:
        sketch.add_numbers(values.astype(np.float64, copy=False))


class WindowSketches:
    """One window's sketches (per feature name and score output) and its capped prediction records."""

    def __init__(self, record_cap: int) -> None:
        self._sketches: dict[tuple[int, str], ColumnSketch] = {}
        self._inputs: dict[str, _Pending] = {}
        self._scores: dict[str, list[float]] = {}
        self._record_cap = record_cap
        self.records: list[Record] = []
        self.records_dropped = 0

    def _sketch(self, kind: int, name: str) -> ColumnSketch:
        sketch = self._sketches.get((kind, name))
        if sketch is None:
            sketch = self._sketches[(kind, name)] = ColumnSketch(name, kind)
        return sketch

    def add_inputs(self, called: Called) -> None:
        """The input tensors of one answered batch (kept by reference until their block is sketched)."""
        for spec in called.signature.inputs:
            array = called.inputs.get(spec.name)
            if array is None or array.ndim == 0 or not len(array):
                continue
            if not spec.feature_names and array.size > MAX_UNNAMED_VALUES_PER_ROW * len(array):
                continue
            pending = self._inputs.get(spec.name)
            if pending is not None and pending.spec is not spec and pending.spec != spec:
                self._flush_input(pending)  # the signature changed: the old layout's rows first
                pending = None
            if pending is None:
                pending = self._inputs[spec.name] = _Pending(spec)
            pending.blocks.append(array)
            pending.rows += len(array)
            if pending.rows >= BLOCK_ROWS:
                self._flush_input(pending)

    def _flush_input(self, pending: _Pending) -> None:
        if not pending.blocks:
            return
        spec, blocks = pending.spec, pending.blocks
        pending.blocks, pending.rows = [], 0
        for name, values in _columns(spec, blocks):
            _sketch_values(self._sketch(FEATURE, name), values, spec.datatype)

    def add_scores(self, name: str, scores: Sequence[float]) -> None:
        """Scores of one batch of the route's score output."""
        buffer = self._scores.setdefault(name, [])
        buffer.extend(scores)
        if len(buffer) >= BLOCK_ROWS:
            self._flush_scores(name)

    def _flush_scores(self, name: str) -> None:
        buffer = self._scores.get(name)
        if buffer:
            self._sketch(SCORE, name).add_numbers(np.asarray(buffer, dtype=np.float64))
            buffer.clear()

    def keep(self, predictions: Sequence[tuple[str, str]], scores: Sequence[float | None], time_ns: int) -> None:
        """Records of one batch's predictions, (request id, unit id) each, up to the cap; a row without a finite
        score (its answer left the score output out, or the model answered NaN) has nothing a label could judge."""
        records = [
            (request_id, time_ns, score, unit_id)
            for (request_id, unit_id), score in zip(predictions, scores, strict=True)
            if score is not None and math.isfinite(score)
        ]
        room = max(self._record_cap - len(self.records), 0)
        self.records.extend(records[:room])
        self.records_dropped += max(len(records) - room, 0)

    def fill(self, message: routing_pb2.MetricsWindow) -> None:
        """Everything still buffered sketched, then the sketches and records written into the window's message."""
        for pending in self._inputs.values():
            self._flush_input(pending)
        for name in self._scores:
            self._flush_scores(name)
        message.value_sketches.extend(self._sketches[key].to_proto() for key in sorted(self._sketches))
        for request_id, time_ns, score, unit_id in self.records:
            record = message.prediction_records.add(request_id=request_id, score=score, unit_id=unit_id)
            record.time.FromNanoseconds(time_ns)
        message.prediction_records_dropped = self.records_dropped
