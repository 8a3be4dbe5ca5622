"""Turning named feature values into the tensors a model's metadata asks for, and model outputs
back into per-request tensors. Knows nothing of gRPC transport."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from chassis.errors import InvalidArgument
from chassis.tensors import NUMPY_DTYPE
from fresco.api.common.v1 import values_pb2
from fresco.api.inference import grpc_service_pb2 as pb
from fresco.client import from_value
from gateway.limits import Limits

Scalar = float | int | bool | str | bytes
FeatureValue = Scalar | list[float] | list[int] | list[str] | None
Row = Mapping[str, FeatureValue]
# A `fresco.common.v1.Value` as a Python value; unset means None (null). The client's conversion, shared.
from_proto = from_value


@dataclass(frozen=True)
class InputSpec:
    """A model input as its metadata describes it."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    feature_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelSignature:
    """What the gateway needs of a model's metadata to build requests."""

    name: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    # Every input and output has a batch dimension (-1 first) and none is BYTES: requests' rows may be sent in
    # one call and the answer split back by rows (`gateway.coalesce`).
    mergeable: bool = False

    @classmethod
    def from_metadata(cls, metadata: pb.ModelMetadataResponse) -> ModelSignature:
        inputs = []
        for tensor in metadata.inputs:
            names = tensor.parameters["feature_names"].string_param if "feature_names" in tensor.parameters else ""
            inputs.append(
                InputSpec(tensor.name, tensor.datatype, tuple(tensor.shape), tuple(n for n in names.split(",") if n))
            )
        tensors = [*metadata.inputs, *metadata.outputs]
        mergeable = bool(metadata.inputs) and all(
            len(t.shape) >= 1 and t.shape[0] == -1 and t.datatype != "BYTES" for t in tensors
        )
        return cls(metadata.name, tuple(inputs), tuple(t.name for t in metadata.outputs), mergeable)


def _numeric(value: FeatureValue, datatype: str, what: str) -> FeatureValue:
    if value is None:
        raise InvalidArgument(f"{what} is null; the model needs a value")
    if datatype == "BYTES":
        if not isinstance(value, (str, bytes)):
            raise InvalidArgument(f"{what}: expected a string or bytes value, got {type(value).__name__}")
        return value
    if isinstance(value, (str, bytes)):
        raise InvalidArgument(f"{what}: expected a number for a {datatype} input, got {type(value).__name__}")
    if isinstance(value, list):
        for item in value:
            _numeric(item, datatype, what)
        return value
    dtype = NUMPY_DTYPE[datatype]
    if dtype.kind in "iu" and isinstance(value, float) and not value.is_integer():
        raise InvalidArgument(f"{what}: expected an integer for a {datatype} input, got {value}")
    if dtype.kind in "iu" and not isinstance(value, bool):
        info = np.iinfo(dtype)
        if not info.min <= value <= info.max:
            raise InvalidArgument(f"{what}: {value} does not fit a {datatype} input")
    return value


def build_inputs(
    signature: ModelSignature, rows: Sequence[Row], labels: Sequence[str], limits: Limits | None = None
) -> dict[str, np.ndarray]:
    """One batched array per model input, row i built from rows[i] (`labels[i]` names it in errors).

    An input whose metadata names its features (`feature_names`) is a feature vector filled in
    that order; any other input takes the feature of the same name. A BYTES input holds at most
    `limits.max_bytes_elements` elements, counted before any is converted.
    """
    limits = limits or Limits()
    arrays: dict[str, np.ndarray] = {}
    for spec in signature.inputs:
        if spec.datatype not in NUMPY_DTYPE:
            raise InvalidArgument(f"model {signature.name!r} input {spec.name!r} has unknown datatype {spec.datatype}")
        dtype = NUMPY_DTYPE[spec.datatype]
        if spec.datatype == "BYTES":
            limits.check_strings(f"model {signature.name!r} input {spec.name!r}", _element_count(spec, rows))
        if spec.feature_names:
            table = [
                [_value(row, feature, spec.datatype, label, scalar=True) for feature in spec.feature_names]
                for row, label in zip(rows, labels, strict=True)
            ]
            array = np.asarray(table, dtype=dtype)
        else:
            column = [_value(row, spec.name, spec.datatype, label) for row, label in zip(rows, labels, strict=True)]
            array = np.asarray(column, dtype=dtype)
        expected_rank = len(spec.shape)
        if array.ndim < expected_rank:
            array = array.reshape(array.shape + (1,) * (expected_rank - array.ndim))
        if array.ndim != expected_rank or any(
            want != -1 and got != want for got, want in zip(array.shape, spec.shape, strict=False)
        ):
            raise InvalidArgument(
                f"model {signature.name!r} input {spec.name!r} needs shape {list(spec.shape)}; "
                f"the features give {list(array.shape)}"
            )
        arrays[spec.name] = array
    return arrays


def _element_count(spec: InputSpec, rows: Sequence[Row]) -> int:
    if spec.feature_names:
        return len(rows) * len(spec.feature_names)
    return sum(len(value) if isinstance(value, list) else 1 for value in (row.get(spec.name) for row in rows))


def _value(row: Row, feature: str, datatype: str, label: str, scalar: bool = False) -> FeatureValue:
    if feature not in row:
        raise InvalidArgument(f"{label}: missing feature {feature!r}, which the model needs")
    value = _numeric(row[feature], datatype, f"{label}: feature {feature!r}")
    if scalar and isinstance(value, list):
        raise InvalidArgument(f"{label}: feature {feature!r}: expected one value, got a list of {len(value)}")
    return value


def to_tensor(array: np.ndarray, datatype: str) -> values_pb2.Tensor:
    """A numpy array as a `fresco.common.v1.Tensor`."""
    tensor = values_pb2.Tensor(datatype=datatype, shape=array.shape)
    flat = array.reshape(-1)
    if datatype == "BYTES":
        tensor.bytes_values.extend(v if isinstance(v, bytes) else str(v).encode() for v in flat)
    elif datatype == "BOOL":
        tensor.bool_values.extend(flat.tolist())
    elif datatype == "BF16":  # raw bfloat16 words are the high half of a float32
        tensor.double_values.extend((flat.astype(np.uint32) << 16).view(np.float32).astype(np.float64).tolist())
    elif datatype == "UINT64":
        tensor.uint64_values.extend(flat.tolist())
    elif flat.dtype.kind in "iu":
        tensor.int64_values.extend(flat.tolist())
    else:
        tensor.double_values.extend(flat.astype(np.float64).tolist())
    return tensor


def split_rows(outputs: Mapping[str, tuple[str, np.ndarray]], batch: int) -> list[dict[str, values_pb2.Tensor]]:
    """Per-request tensors from batched outputs: row i of each output whose first dimension is the
    batch; an output without a batch dimension goes whole to every request."""
    per_row: list[dict[str, values_pb2.Tensor]] = [{} for _ in range(batch)]
    for name, (datatype, array) in outputs.items():
        batched = array.ndim > 0 and array.shape[0] == batch
        for i in range(batch):
            # A slice, not array[i]: an element of an object (BYTES) array is not an array.
            per_row[i][name] = to_tensor(array[i : i + 1].reshape(array.shape[1:]) if batched else array, datatype)
    return per_row
