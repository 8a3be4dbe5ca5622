"""The Open Inference Protocol's REST form (KServe v2 over HTTP, with Triton's binary tensor
extension) as the gRPC messages the servicer takes, and its answers back as JSON.

Every request is turned into the same `ModelInferRequest` a gRPC caller sends, its tensors in
`raw_input_contents`, so the checks against the model (names, datatypes, shapes, NaN, limits) are the
ones `predictor.codec` makes for both transports. What is checked here is only the JSON itself: each
error names the field, as `inputs[0].shape`, and what was expected."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from chassis.errors import InvalidArgument
from chassis.tensors import DATATYPES, array_from_raw, numpy_dtype, raw_from_array
from fresco.api.inference import grpc_service_pb2 as pb

# Triton's binary tensor extension: the length of the JSON part of a body that binary tensors follow.
INFERENCE_HEADER = "Inference-Header-Content-Length"
BINARY_DATA_SIZE = "binary_data_size"
BINARY_DATA = "binary_data"
BINARY_DATA_OUTPUT = "binary_data_output"
# Triton's `timeout` request parameter, in microseconds: the request's deadline.
TIMEOUT = "timeout"
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
_INT64 = (-(1 << 63), (1 << 63) - 1)
_UINT64_MAX = (1 << 64) - 1
_REQUEST_FIELDS = {"id", "parameters", "inputs", "outputs", "model_name", "model_version"}
_INPUT_FIELDS = {"name", "shape", "datatype", "parameters", "data"}
_OUTPUT_FIELDS = {"name", "parameters"}
Scalar = bool | int | float | str


# -- JSON fields ---------------------------------------------------------------------------------


def parse_json(text: bytes | memoryview, what: str = "request body") -> Any:
    """The JSON document in `text`; INVALID_ARGUMENT saying where it is malformed."""
    try:
        return json.loads(bytes(text))
    except RecursionError:
        raise InvalidArgument(f"{what}: JSON nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, and UnicodeDecodeError for bytes that are no text
        raise InvalidArgument(f"{what}: not valid JSON: {err}") from None


def _object(value: object, path: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{path}: expected a JSON object, got {_kind(value)}")
    if unknown := sorted(set(value) - allowed):
        raise InvalidArgument(f"{path}: unknown fields {unknown}; expected some of {sorted(allowed)}")
    return value


def _string(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{path}: expected a string, got {_kind(value)}")
    return value


def _list(value: object, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidArgument(f"{path}: expected a JSON array, got {_kind(value)}")
    return value


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{path}: expected true or false, got {_kind(value)}")
    return value


def _count(value: object, path: str) -> int:
    """A non-negative integer that fits int64."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _INT64[1]:
        raise InvalidArgument(f"{path}: expected a non-negative integer, got {_kind(value)}")
    return value


def _kind(value: object) -> str:
    text = json.dumps(value) if isinstance(value, bool | int | float | str) or value is None else type(value).__name__
    kind = {"dict": "an object", "list": "an array"}.get(text, text)
    return kind if len(kind) <= 40 else kind[:37] + "..."


def _parameters(value: object, path: str) -> dict[str, Scalar]:
    """A `parameters` object: names to booleans, numbers or strings."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{path}: expected a JSON object, got {_kind(value)}")
    for key, item in value.items():
        if not isinstance(item, bool | int | float | str):
            raise InvalidArgument(f"{path}.{key}: expected a boolean, number or string, got {_kind(item)}")
    return value


def _set_parameter(target: pb.InferParameter, value: Scalar, path: str) -> None:
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        if _INT64[0] <= value <= _INT64[1]:
            target.int64_param = value
        elif 0 <= value <= _UINT64_MAX:
            target.uint64_param = value
        else:
            raise InvalidArgument(f"{path}: {value} does not fit a 64-bit integer")
    elif isinstance(value, float):
        target.double_param = value
    else:
        target.string_param = value


def _refuse_shared_memory(parameters: Mapping[str, Scalar], path: str) -> None:
    for key in _SHARED_MEMORY:
        if key in parameters:
            raise InvalidArgument(
                f"{path}.{key}: the shared-memory extension is not served here; send the tensor in the body"
            )


# -- Tensors ---------------------------------------------------------------------------------------


def _flatten(data: object, path: str) -> list[Any]:
    """The elements of `data`, a flat or nested (row-major) JSON array."""
    flat = _list(data, path)
    while any(isinstance(item, list) for item in flat):
        level: list[Any] = []
        for item in flat:
            if isinstance(item, list):
                level.extend(item)
            else:
                level.append(item)
        flat = level
    return flat


def _elements_of(flat: list[Any], allowed: tuple[type, ...], expected: str, datatype: str, path: str) -> None:
    for item in flat:
        # type() rather than isinstance: True is an int to Python, but not an element of an INT32 tensor.
        if type(item) not in allowed:
            raise InvalidArgument(f"{path}: {datatype} elements are {expected}, got {_kind(item)}")


def raw_from_json(data: object, datatype: str, shape: list[int], path: str) -> bytes:
    """A tensor's JSON `data` as its raw wire bytes, each element checked to be of its datatype
    and in its range (a value that does not fit is refused, never wrapped or rounded to infinity)."""
    flat = _flatten(data, path)
    count = math.prod(shape)
    if len(flat) != count:
        raise InvalidArgument(f"{path}: holds {len(flat)} elements, shape {shape} needs {count}")
    if datatype == "BYTES":
        _elements_of(flat, (str,), "strings", datatype, path)
        array = np.empty(len(flat), dtype=np.object_)
        try:
            array[:] = [item.encode() for item in flat]
        except UnicodeEncodeError:  # a lone surrogate, which JSON's \u escapes can write
            raise InvalidArgument(f"{path}: a string is not valid Unicode (a lone surrogate)") from None
        return raw_from_array(array, datatype)
    if datatype == "BF16":
        raise InvalidArgument(f"{path}: JSON has no bfloat16; send BF16 tensors as binary data ({BINARY_DATA_SIZE})")
    dtype = numpy_dtype(datatype, path)
    if datatype == "BOOL":
        _elements_of(flat, (bool,), "true or false", datatype, path)
        return raw_from_array(np.array(flat, dtype=dtype), datatype)
    if dtype.kind in "iu":
        _elements_of(flat, (int,), "integers", datatype, path)
        info = np.iinfo(dtype)
        if flat and (min(flat) < info.min or max(flat) > info.max):
            raise InvalidArgument(f"{path}: a value is outside {datatype}'s range [{info.min}, {info.max}]")
        return raw_from_array(np.array(flat, dtype=dtype), datatype)
    _elements_of(flat, (int, float), "numbers", datatype, path)
    try:
        wide = np.array(flat, dtype=np.float64)
    except OverflowError:
        raise InvalidArgument(f"{path}: a value is outside {datatype}'s range") from None
    with np.errstate(over="ignore"):
        narrow = wide.astype(dtype)
    if np.any(np.isinf(narrow) & np.isfinite(wide)):
        raise InvalidArgument(f"{path}: a value is outside {datatype}'s range")
    return raw_from_array(narrow, datatype)


def json_from_raw(raw: bytes, datatype: str, shape: list[int], what: str) -> list[Any]:
    """A tensor's raw wire bytes as the flat, row-major JSON `data` array."""
    array = array_from_raw(raw, datatype, shape, what).reshape(-1)
    if datatype == "BYTES":
        try:
            return [item.decode() for item in array]
        except UnicodeDecodeError:
            raise InvalidArgument(
                f"{what}: an element is not UTF-8 text, which JSON cannot carry; "
                f"ask for it as binary data (parameters.{BINARY_DATA}: true)"
            ) from None
    if datatype == "BF16":  # widened exactly: a bfloat16 is the upper half of a float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    values: list[Any] = array.tolist()
    return values


# -- Inference ------------------------------------------------------------------------------------


@dataclass
class InferCall:
    """An inference request as the servicer takes it, and how its caller wants the answer."""

    request: pb.ModelInferRequest
    binary_outputs: bool = False
    binary_by_output: dict[str, bool] = field(default_factory=dict)
    timeout_s: float | None = None

    def binary(self, output: str) -> bool:
        """Whether `output` goes back as binary data after the JSON."""
        return self.binary_by_output.get(output, self.binary_outputs)


def split_body(body: bytes, header_length: str | None) -> tuple[memoryview, memoryview]:
    """The JSON part of a body and the binary tensor data after it."""
    view = memoryview(body)
    if header_length is None:
        return view, view[len(body) :]
    try:
        length = int(header_length)
    except ValueError:
        length = -1
    if not 0 <= length <= len(body):
        raise InvalidArgument(
            f"{INFERENCE_HEADER} header: expected the JSON's length, 0 to {len(body)} bytes, got {header_length!r}"
        )
    return view[:length], view[length:]


def decode_infer_request(model: str, version: str, body: bytes, header_length: str | None) -> InferCall:
    """An inference request body (JSON, or JSON followed by binary tensors) as a `ModelInferRequest`."""
    text, binary = split_body(body, header_length)
    document = _object(parse_json(text), "request body", _REQUEST_FIELDS)
    for key, in_url in (("model_name", model), ("model_version", version)):
        if key in document and _string(document[key], key) != in_url:
            raise InvalidArgument(f"{key}: {document[key]!r} differs from the URL's {in_url!r}")
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=_string(document.get("id", ""), "id"))
    call = InferCall(request)
    for key, value in _parameters(document.get("parameters"), "parameters").items():
        where = f"parameters.{key}"
        if key == BINARY_DATA_OUTPUT:
            call.binary_outputs = _bool(value, where)
        elif key == TIMEOUT:
            call.timeout_s = _count(value, where) / 1e6 or None  # 0: none, as in Triton
        else:
            _set_parameter(request.parameters[key], value, where)
    offset = 0
    for index, item in enumerate(_list(document.get("inputs"), "inputs")):
        path = f"inputs[{index}]"
        given = _object(item, path, _INPUT_FIELDS)
        name = _string(given.get("name"), f"{path}.name")
        datatype = _string(given.get("datatype"), f"{path}.datatype")
        if datatype not in DATATYPES:
            raise InvalidArgument(f"{path}.datatype: expected one of {', '.join(sorted(DATATYPES))}, got {datatype!r}")
        shape = [_count(dim, f"{path}.shape") for dim in _list(given.get("shape"), f"{path}.shape")]
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        parameters = _parameters(given.get("parameters"), f"{path}.parameters")
        _refuse_shared_memory(parameters, f"{path}.parameters")
        if BINARY_DATA_SIZE in parameters:
            size = _count(parameters[BINARY_DATA_SIZE], f"{path}.parameters.{BINARY_DATA_SIZE}")
            if "data" in given:
                raise InvalidArgument(f"{path}: give either data or parameters.{BINARY_DATA_SIZE}, not both")
            if size > len(binary) - offset:
                raise InvalidArgument(
                    f"{path}.parameters.{BINARY_DATA_SIZE}: {size} bytes, but {len(binary) - offset} bytes of "
                    f"binary data remain after the JSON (its length is the {INFERENCE_HEADER} header)"
                )
            request.raw_input_contents.append(bytes(binary[offset : offset + size]))
            offset += size
        elif "data" in given:
            request.raw_input_contents.append(raw_from_json(given["data"], datatype, shape, f"{path}.data"))
        else:
            raise InvalidArgument(
                f"{path}: expected data, or parameters.{BINARY_DATA_SIZE} and the bytes after the JSON"
            )
        for key, value in parameters.items():
            if key != BINARY_DATA_SIZE:
                _set_parameter(tensor.parameters[key], value, f"{path}.parameters.{key}")
    if offset != len(binary):
        raise InvalidArgument(
            f"request body: {len(binary) - offset} bytes follow the JSON that no input's "
            f"parameters.{BINARY_DATA_SIZE} accounts for"
        )
    for index, item in enumerate(_list(document.get("outputs", []), "outputs")):
        path = f"outputs[{index}]"
        given = _object(item, path, _OUTPUT_FIELDS)
        output = request.outputs.add(name=_string(given.get("name"), f"{path}.name"))
        parameters = _parameters(given.get("parameters"), f"{path}.parameters")
        _refuse_shared_memory(parameters, f"{path}.parameters")
        for key, value in parameters.items():
            where = f"{path}.parameters.{key}"
            if key == BINARY_DATA:
                call.binary_by_output[output.name] = _bool(value, where)
            elif key == "classification":
                raise InvalidArgument(f"{where}: the classification extension is not served here")
            else:
                _set_parameter(output.parameters[key], value, where)
    return call


def encode_infer_response(response: pb.ModelInferResponse, binary: Callable[[str], bool]) -> tuple[bytes, int | None]:
    """The answer's body, and the length of its JSON part when binary tensors follow it."""
    outputs: list[dict[str, Any]] = []
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        document["id"] = response.id
    document["outputs"] = outputs
    chunks: list[bytes] = []
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        shape = list(tensor.shape)
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": shape}
        if binary(tensor.name):
            entry["parameters"] = {BINARY_DATA_SIZE: len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = json_from_raw(raw, tensor.datatype, shape, f"output {tensor.name!r}")
        outputs.append(entry)
    header = dumps(document)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


# -- Other calls -----------------------------------------------------------------------------------


def dumps(document: object) -> bytes:
    """Compact JSON bytes."""
    return json.dumps(document, separators=(",", ":")).encode()


def body_object(body: bytes, allowed: set[str]) -> dict[str, Any]:
    """A request body that is a JSON object of `allowed` fields, or empty (an empty object)."""
    if not body.strip():
        return {}
    return _object(parse_json(body), "request body", allowed)


def repository_index_request(body: bytes) -> pb.RepositoryIndexRequest:
    """POST v2/repository/index's body: `{"ready": bool}`, optional."""
    document = body_object(body, {"ready", "repository_name"})
    return pb.RepositoryIndexRequest(
        ready=_bool(document.get("ready", False), "ready"),
        repository_name=_string(document.get("repository_name", ""), "repository_name"),
    )


def load_request(model: str, body: bytes) -> pb.RepositoryModelLoadRequest:
    """A load's body: `parameters` with `config` (JSON text) and `file:<path>` (base64) entries."""
    request = pb.RepositoryModelLoadRequest(model_name=model)
    parameters = _parameters(body_object(body, {"parameters"}).get("parameters"), "parameters")
    for key, value in parameters.items():
        where = f"parameters[{key!r}]"
        target = request.parameters[key]
        if key.startswith("file:"):
            try:  # Triton's HTTP form of a file: its bytes in base64
                target.bytes_param = base64.b64decode(_string(value, where), validate=True)
            except ValueError:
                raise InvalidArgument(f"{where}: expected the file's bytes in base64") from None
        elif isinstance(value, bool):
            target.bool_param = value
        elif isinstance(value, int) and _INT64[0] <= value <= _INT64[1]:
            target.int64_param = value
        elif isinstance(value, str):
            target.string_param = value
        else:
            raise InvalidArgument(f"{where}: expected a boolean, a 64-bit integer or a string, got {_kind(value)}")
    return request


def unload_request(model: str, body: bytes) -> pb.RepositoryModelUnloadRequest:
    """An unload's body: `parameters`, e.g. `{"unload_dependents": false}`."""
    request = pb.RepositoryModelUnloadRequest(model_name=model)
    for key, value in _parameters(body_object(body, {"parameters"}).get("parameters"), "parameters").items():
        where = f"parameters[{key!r}]"
        if isinstance(value, bool):
            request.parameters[key].bool_param = value
        elif isinstance(value, str):
            request.parameters[key].string_param = value
        else:
            raise InvalidArgument(f"{where}: expected a boolean or a string, got {_kind(value)}")
    return request


def message_json(message: Message) -> dict[str, Any]:
    """A protocol message as the REST form writes it: field names as in the proto, 64-bit integers as
    JSON numbers (not protobuf's strings), enums by name, parameters as their plain values, unset
    sub-messages and oneof members left out."""
    document: dict[str, Any] = {}
    for spec in message.DESCRIPTOR.fields:
        singular_message = spec.type == FieldDescriptor.TYPE_MESSAGE and not spec.is_repeated
        if (spec.containing_oneof is not None or singular_message) and not message.HasField(spec.name):
            continue
        value = getattr(message, spec.name)
        if spec.message_type is not None and spec.message_type.GetOptions().map_entry:
            value_spec = spec.message_type.fields_by_name["value"]
            document[spec.name] = {key: _field_json(value_spec, item) for key, item in value.items()}
        elif spec.is_repeated:
            document[spec.name] = [_field_json(spec, item) for item in value]
        else:
            document[spec.name] = _field_json(spec, value)
    return document


def _field_json(spec: Any, value: Any) -> Any:
    if spec.type == FieldDescriptor.TYPE_MESSAGE:
        fields = spec.message_type.fields_by_name
        if "parameter_choice" in spec.message_type.oneofs_by_name:  # a parameter: its one value
            chosen = value.WhichOneof("parameter_choice")
            return None if chosen is None else _field_json(fields[chosen], getattr(value, chosen))
        return message_json(value)
    if spec.type == FieldDescriptor.TYPE_ENUM:
        known = spec.enum_type.values_by_number.get(value)
        return known.name if known is not None else value
    if spec.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return value
