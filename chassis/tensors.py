"""The inference protocol's tensors: datatypes with their numpy and ONNX equivalents, and the
raw wire form (little-endian elements; BYTES elements each behind a 4-byte length)."""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Sequence

import numpy as np

from chassis.errors import InvalidArgument

# BF16 has no numpy dtype; it travels as raw 2-byte words and is widened where a backend needs it.
NUMPY_DTYPE: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BF16": np.dtype(np.uint16),
    "BYTES": np.dtype(np.object_),
}

DATATYPES = frozenset(NUMPY_DTYPE)

_DATATYPE_OF_NUMPY: dict[np.dtype, str] = {
    dtype: name for name, dtype in NUMPY_DTYPE.items() if name not in ("BF16", "BYTES")
}

# ONNX Runtime's type strings, e.g. "tensor(float)".
ONNX_TYPE: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(bfloat16)": "BF16",
    "tensor(string)": "BYTES",
}

# Which InferTensorContents field carries each datatype in typed form.
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def numpy_dtype(datatype: str, what: str) -> np.dtype:
    """The numpy dtype of a protocol datatype; `what` names the tensor in the error."""
    try:
        return NUMPY_DTYPE[datatype]
    except KeyError:
        raise InvalidArgument(
            f"{what}: unknown datatype {datatype!r}; expected one of {', '.join(sorted(DATATYPES))}"
        ) from None


def datatype_of(array: np.ndarray) -> str:
    """The protocol datatype of a numpy array."""
    if array.dtype == np.object_ or array.dtype.kind in ("S", "U"):
        return "BYTES"
    try:
        return _DATATYPE_OF_NUMPY[array.dtype]
    except KeyError:
        raise InvalidArgument(f"numpy dtype {array.dtype} has no inference-protocol datatype") from None


_LENGTH = struct.Struct("<I")


def decode_bytes_tensor(raw: bytes, count: int, what: str) -> np.ndarray:
    """Split length-prefixed BYTES elements (4-byte little-endian length, then the bytes)."""
    items: list[bytes] = []
    offset, end = 0, len(raw)
    view = memoryview(raw)
    while offset < end:
        if end - offset < 4:
            raise InvalidArgument(
                f"{what}: BYTES element {len(items)} has a truncated length prefix "
                f"({end - offset} bytes left, 4 expected)"
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if length > end - offset:
            raise InvalidArgument(
                f"{what}: BYTES element {len(items)} length prefix says {length} bytes but only {end - offset} remain"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
        if len(items) > count:  # stop at once: the shape bounds the work, not the sender's bytes
            break
    if len(items) != count:
        held = f"at least {len(items)}" if len(items) > count else str(len(items))
        raise InvalidArgument(f"{what}: holds {held} BYTES elements, its shape needs {count}")
    array = np.empty(count, dtype=np.object_)
    array[:] = items
    return array


def encode_bytes_tensor(array: np.ndarray) -> bytes:
    """Length-prefix each element of a BYTES (object or string) array."""
    parts = []
    for item in array.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode()
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def array_from_raw(raw: bytes, datatype: str, shape: Sequence[int], what: str) -> np.ndarray:
    """A read-only view of raw tensor bytes (BYTES elements are split into an object array)."""
    count = math.prod(shape)
    if datatype == "BYTES":
        return decode_bytes_tensor(raw, count, what).reshape(shape)
    dtype = numpy_dtype(datatype, what)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidArgument(
            f"{what}: raw contents hold {len(raw)} bytes, shape {list(shape)} of {datatype} needs {expected}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def raw_from_array(array: np.ndarray, datatype: str) -> bytes:
    """The raw wire bytes of an array."""
    if datatype == "BYTES":
        return encode_bytes_tensor(array)
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and sys.byteorder == "big"):
        array = array.astype(array.dtype.newbyteorder("<"))  # the wire is little-endian
    return array.tobytes()  # C order, whatever the array's layout
