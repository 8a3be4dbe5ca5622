"""Decoding ModelInferRequest tensors into numpy arrays checked against the model's inputs, and
encoding results back. Raw tensors are viewed in place with `np.frombuffer`, never copied."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from chassis.errors import InvalidArgument
from chassis.tensors import CONTENTS_FIELD, array_from_raw, numpy_dtype, raw_from_array
from fresco.api.inference import grpc_service_pb2 as pb
from predictor.backends.base import TensorSpec

# BYTES elements one tensor may hold: each costs ~50 bytes of Python objects once decoded.
DEFAULT_MAX_BYTES_ELEMENTS = 1 << 20
_MAX_BYTES = int(np.iinfo(np.intp).max)  # the largest array numpy can address


def _check_shape(shape: Sequence[int], spec: TensorSpec, what: str) -> None:
    if any(dim < 0 for dim in shape):
        raise InvalidArgument(f"{what}: shape {list(shape)} has a negative dimension")
    if len(shape) != len(spec.shape) or any(
        want != -1 and got != want for got, want in zip(shape, spec.shape, strict=False)
    ):
        raise InvalidArgument(f"{what}: shape {list(shape)} does not match the model's {list(spec.shape)}")


def _decode_one(
    tensor: pb.ModelInferRequest.InferInputTensor,
    raw: bytes | None,
    spec: TensorSpec,
    what: str,
    max_bytes_elements: int,
) -> np.ndarray:
    if tensor.datatype != spec.datatype:
        raise InvalidArgument(f"{what}: datatype {tensor.datatype or '(empty)'} but the model expects {spec.datatype}")
    shape = tuple(tensor.shape)
    _check_shape(shape, spec, what)
    count = math.prod(shape)
    if spec.datatype == "BYTES" and count > max_bytes_elements:
        raise InvalidArgument(
            f"{what}: {count} BYTES elements exceed the limit of {max_bytes_elements} per tensor "
            "(setting max_bytes_elements, FRESCO_PREDICTOR_MAX_BYTES_ELEMENTS)"
        )
    dtype = numpy_dtype(spec.datatype, what)
    if math.prod(dim for dim in shape if dim) * dtype.itemsize > _MAX_BYTES:
        raise InvalidArgument(f"{what}: shape {list(shape)} is too large")
    if raw is not None:
        return array_from_raw(raw, spec.datatype, shape, what)
    field = CONTENTS_FIELD.get(spec.datatype)
    if field is None:
        raise InvalidArgument(f"{what}: {spec.datatype} has no typed contents; send it in raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidArgument(f"{what}: {field} holds {len(values)} values, shape {list(shape)} needs {count}")
    if spec.datatype == "BYTES":
        array = np.empty(count, dtype=np.object_)
        array[:] = list(values)
        return array.reshape(shape)
    if dtype.kind in "iu":
        # int_contents and uint_contents carry 8- and 16-bit types too: check the range, numpy would wrap.
        wide = np.asarray(values, dtype=np.uint64 if spec.datatype == "UINT64" else np.int64)
        info = np.iinfo(dtype)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise InvalidArgument(f"{what}: a value in {field} does not fit {spec.datatype}")
        return wide.astype(dtype).reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


def _check_feature_order(tensor: pb.ModelInferRequest.InferInputTensor, spec: TensorSpec, what: str) -> None:
    """A tensor built from named features (the gateway says in which order, in `feature_names`) must
    be in the order this version reads them: a reload may have reordered them under the same shape,
    and same-shaped columns in the wrong order give silently wrong answers."""
    if not spec.features or "feature_names" not in tensor.parameters:
        return
    sent = tensor.parameters["feature_names"].string_param
    if sent != ",".join(spec.features):
        raise InvalidArgument(
            f"{what}: parameters['feature_names'] says its columns are [{sent}], but this version of the "
            f"model reads [{','.join(spec.features)}]; build the tensor again from the model's metadata"
        )


def decode_cost(request: pb.ModelInferRequest) -> int:
    """About how many bytes decoding walks element by element in Python: BYTES raw contents and
    typed contents (numeric raw contents are viewed in place, at no cost)."""
    cost = 0
    for index, tensor in enumerate(request.inputs):
        if tensor.datatype == "BYTES" and index < len(request.raw_input_contents):
            cost += len(request.raw_input_contents[index])
        for _, values in tensor.contents.ListFields():
            cost += 8 * len(values)
    return cost


def decode_inputs(
    request: pb.ModelInferRequest, specs: Sequence[TensorSpec], max_bytes_elements: int = DEFAULT_MAX_BYTES_ELEMENTS
) -> dict[str, np.ndarray]:
    """The request's inputs as arrays, each checked against the model's input of that name."""
    by_name = {spec.name: spec for spec in specs}
    raw_count = len(request.raw_input_contents)
    if raw_count and raw_count != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {raw_count} entries but inputs has {len(request.inputs)}; "
            "give one per input, or none and use typed contents"
        )
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        what = f"input {tensor.name!r}"
        spec = by_name.get(tensor.name)
        if spec is None:
            raise InvalidArgument(f"{what} is not an input of model {request.model_name!r}; it takes {sorted(by_name)}")
        if tensor.name in arrays:
            raise InvalidArgument(f"{what} is given twice")
        _check_feature_order(tensor, spec, what)
        if raw_count and tensor.HasField("contents"):
            # Triton's wording, which its clients match on.
            raise InvalidArgument(
                f"contents field must not be specified when using raw_input_contents for '{tensor.name}' "
                f"for model '{request.model_name}'; send each input either typed or raw"
            )
        raw = request.raw_input_contents[index] if raw_count else None
        array = _decode_one(tensor, raw, spec, what, max_bytes_elements)
        if not spec.allow_nan and array.dtype.kind == "f" and np.isnan(array).any():
            raise InvalidArgument(f"{what}: contains NaN, which this model's config forbids")
        arrays[tensor.name] = array
    if missing := [name for name in by_name if name not in arrays]:
        raise InvalidArgument(f"model {request.model_name!r} needs inputs {missing}, which the request lacks")
    return arrays


def requested_outputs(request: pb.ModelInferRequest, specs: Sequence[TensorSpec]) -> list[str]:
    """Names of the outputs asked for (all when none are named), each checked to exist."""
    known = [spec.name for spec in specs]
    names = [output.name for output in request.outputs]
    for name in names:
        if name not in known:
            raise InvalidArgument(f"requested output {name!r} is not an output of the model; it has {known}")
    return names or known


def encode_cost(results: Mapping[str, np.ndarray]) -> int:
    """How many elements encoding walks one by one in Python: those of BYTES outputs."""
    return sum(array.size for array in results.values() if array.dtype == np.object_)


def encode_response(
    request: pb.ModelInferRequest,
    version: str,
    results: Mapping[str, np.ndarray],
    datatypes: Mapping[str, str],
) -> pb.ModelInferResponse:
    """The answer with each output in raw_output_contents, in the order asked for."""
    response = pb.ModelInferResponse(model_name=request.model_name, model_version=version, id=request.id)
    for name, array in results.items():
        datatype = datatypes[name]
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(raw_from_array(array, datatype))
    return response
