"""A backtest: a historical Parquet dataset (any fsspec URI) scored in process with ONNX Runtime, evaluated
overall and per slice, with the dataset's sha256 so the same measurement can be made again.

Blocking and CPU-heavy: callers run it in a worker thread.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import fsspec
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager.metrics import Array, Evaluation, evaluate

BATCH_ROWS = 4096
NUMPY_TYPES: dict[str, type[np.generic]] = {
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}


class BacktestError(Exception):
    """The backtest could not be measured (unreadable dataset, missing column, model that does not load)."""


class DatasetMismatch(BacktestError):
    """The dataset's bytes are not the ones the gate expects (dataset_sha256)."""


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset and the digest of the bytes it was read from."""

    uri: str
    sha256: str
    table: pa.Table


@dataclass(frozen=True)
class Scored:
    """One model's evaluation of a dataset: overall and per slice value."""

    evaluation: Evaluation
    slices: dict[str, Evaluation]


def load_dataset(uri: str, expected_sha256: str = "") -> Dataset:
    """Read a Parquet file through fsspec, hash its bytes and check them against `expected_sha256` when set."""
    try:
        with fsspec.open(uri, "rb") as file:
            content = file.read()
    except (OSError, ValueError) as err:
        raise BacktestError(f"dataset_uri: cannot read {uri}: {err}") from err
    except ImportError as err:  # fsspec knows the protocol, but its filesystem package is not installed
        raise BacktestError(f"dataset_uri: no filesystem installed for {uri}: {err}") from err
    digest = hashlib.sha256(content).hexdigest()
    if expected_sha256 and digest != expected_sha256:
        raise DatasetMismatch(
            f"dataset_sha256: expected {expected_sha256}, but the {len(content)} bytes at {uri} hash to {digest}; "
            "the dataset changed since the gate was written, so its backtest would not be reproducible"
        )
    try:
        table = pq.read_table(io.BytesIO(content))
    except (pa.ArrowInvalid, OSError) as err:
        raise BacktestError(f"dataset_uri: {uri} is not a readable Parquet file: {err}") from err
    return Dataset(uri, digest, table)


def _column(table: pa.Table, name: str) -> npt.NDArray[np.float64]:
    column = table.column(name)
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type)):
        raise BacktestError(f"dataset: column {name!r} holds {column.type}; expected numbers")
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)


def feature_matrix(table: pa.Table, signature: rpb.ModelSignature) -> npt.NDArray[np.generic]:
    """The model's feature input: one column per feature ref, named as the ref ("view:feature") or the feature."""
    if not signature.feature_refs or not signature.feature_input:
        raise BacktestError("signature: a backtest needs feature_refs and feature_input to build the model's input")
    spec = next((t for t in signature.inputs if t.name == signature.feature_input), None)
    if spec is None:
        raise BacktestError(f"signature.feature_input: no input named {signature.feature_input!r}")
    dtype = NUMPY_TYPES.get(spec.datatype)
    if dtype is None:
        raise BacktestError(f"signature.inputs: a backtest scores numeric inputs, not {spec.datatype}")
    columns = []
    for ref in signature.feature_refs:
        short = ref.rsplit(":", 1)[-1]
        name = ref if ref in table.column_names else short
        if name not in table.column_names:
            raise BacktestError(f"dataset: no column for feature {ref!r} (looked for {ref!r} and {short!r})")
        columns.append(_column(table, name))
    return np.stack(columns, axis=1).astype(dtype)


def _score_vector(output: npt.NDArray[np.generic], name: str) -> Array:
    values = np.asarray(output, dtype=np.float64)
    if values.ndim == 1:
        return values
    if values.ndim == 2 and values.shape[1] == 1:
        return values[:, 0]
    if values.ndim == 2 and values.shape[1] == 2:
        return values[:, 1]  # class probabilities of a binary classifier: the positive class
    raise BacktestError(f"score_output: {name} has shape {list(values.shape)}; expected one score per row")


def load_session(artifact: bytes) -> ort.InferenceSession:
    """An ONNX Runtime session on the CPU; BacktestError when the bytes are not a model it can load."""
    try:
        return ort.InferenceSession(artifact, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for a bad graph
        raise BacktestError(f"artifact: ONNX Runtime cannot load the model: {str(err)[:300]}") from err


def score(artifact: bytes, signature: rpb.ModelSignature, features: npt.NDArray[np.generic], output: str) -> Array:
    """One score per row from an ONNX model run in process on the feature matrix, in batches."""
    session = load_session(artifact)
    inputs = [i.name for i in session.get_inputs()]
    if inputs != [signature.feature_input]:
        raise BacktestError(f"artifact: a backtest feeds one input {signature.feature_input!r}; the model has {inputs}")
    outputs = [o.name for o in session.get_outputs()]
    name = output or outputs[0]
    if name not in outputs:
        raise BacktestError(f"score_output: the model has no output {name!r}; it has {outputs}")
    parts = []
    for start in range(0, features.shape[0], BATCH_ROWS):
        result = session.run([name], {signature.feature_input: features[start : start + BATCH_ROWS]})
        parts.append(_score_vector(np.asarray(result[0]), name))
    return np.concatenate(parts) if parts else np.zeros(0)


def labels_of(table: pa.Table, label_column: str) -> Array:
    """The label column as floats; a missing column or null labels cannot be scored."""
    if label_column not in table.column_names:
        raise BacktestError(f"label_column: the dataset has no column {label_column!r}")
    if table.column(label_column).null_count:
        raise BacktestError(f"label_column: {table.column(label_column).null_count} rows have no label")
    return _column(table, label_column)


def slice_values(table: pa.Table, slice_column: str) -> list[str]:
    """Each row's slice as "column=value"."""
    if slice_column not in table.column_names:
        raise BacktestError(f"slice_column: the dataset has no column {slice_column!r}")
    return [f"{slice_column}={value}" for value in table.column(slice_column).to_pylist()]


def evaluate_scores(labels: Array, scores: Array, slices: list[str] | None) -> Scored:
    """The evaluation overall and per slice (slices in sorted order)."""
    if labels.size == 0:
        raise BacktestError("dataset_uri: the dataset has no rows")
    overall = evaluate(labels, scores)
    by_slice: dict[str, Evaluation] = {}
    if slices is not None:
        keys = np.asarray(slices, dtype=object)
        for key in sorted(set(slices)):
            members = keys == key
            by_slice[key] = evaluate(labels[members], scores[members])
    return Scored(overall, by_slice)


def report(dataset: Dataset, candidate: Scored, baseline: Scored | None, baseline_version: int) -> rpb.BacktestReport:
    """What the backtest measured, with the dataset's digest."""
    result = rpb.BacktestReport(
        dataset_uri=dataset.uri,
        dataset_sha256=dataset.sha256,
        rows=candidate.evaluation.rows,
        metrics=candidate.evaluation.metrics,
        baseline_version=baseline_version if baseline is not None else 0,
        baseline_metrics=baseline.evaluation.metrics if baseline is not None else {},
        slices=[
            rpb.SliceMetrics(slice=key, count=value.rows, metrics=value.metrics)
            for key, value in candidate.slices.items()
        ],
    )
    if candidate.evaluation.calibration is not None:
        result.calibration.CopyFrom(candidate.evaluation.calibration)
    return result
