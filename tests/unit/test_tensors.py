"""Inference-protocol datatypes and the raw wire form of tensors."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from chassis.errors import InvalidArgument
from chassis.tensors import (
    CONTENTS_FIELD,
    DATATYPES,
    NUMPY_DTYPE,
    ONNX_TYPE,
    array_from_raw,
    datatype_of,
    decode_bytes_tensor,
    encode_bytes_tensor,
    numpy_dtype,
    raw_from_array,
)
from fresco.api.inference import grpc_service_pb2 as pb

NUMERIC = sorted(DATATYPES - {"BYTES"})
ITEMSIZE = {
    "BOOL": 1, "INT8": 1, "UINT8": 1, "INT16": 2, "UINT16": 2, "FP16": 2, "BF16": 2,
    "INT32": 4, "UINT32": 4, "FP32": 4, "INT64": 8, "UINT64": 8, "FP64": 8,
}  # fmt: skip


def test_datatype_tables_agree() -> None:
    assert {*ITEMSIZE, "BYTES"} == DATATYPES
    assert set(ONNX_TYPE.values()) == DATATYPES
    for name in NUMERIC:
        assert NUMPY_DTYPE[name].itemsize == ITEMSIZE[name], name
    assert NUMPY_DTYPE["BYTES"] == np.dtype(object)
    assert NUMPY_DTYPE["BF16"] == np.dtype(np.uint16)  # BF16 travels as raw 2-byte words


def test_contents_fields_exist_and_leave_out_half_floats() -> None:
    fields = pb.InferTensorContents.DESCRIPTOR.fields_by_name
    assert set(CONTENTS_FIELD) == DATATYPES - {"FP16", "BF16"}
    for datatype, field in CONTENTS_FIELD.items():
        assert field in fields, (datatype, field)
    assert CONTENTS_FIELD["INT8"] == CONTENTS_FIELD["INT32"] == "int_contents"
    assert CONTENTS_FIELD["UINT16"] == "uint_contents"
    assert CONTENTS_FIELD["INT64"] == "int64_contents"


def test_numpy_dtype_of_unknown_datatype_names_the_tensor() -> None:
    assert numpy_dtype("FP32", "input 'x'") == np.float32
    with pytest.raises(InvalidArgument, match=r"input 'x': unknown datatype 'FLOAT'; expected one of BF16, BOOL"):
        numpy_dtype("FLOAT", "input 'x'")


@pytest.mark.parametrize("datatype", sorted(DATATYPES - {"BYTES", "BF16"}))
def test_datatype_of_inverts_numpy_dtype(datatype: str) -> None:
    assert datatype_of(np.zeros(2, dtype=NUMPY_DTYPE[datatype])) == datatype


def test_datatype_of_strings_and_unknown() -> None:
    assert datatype_of(np.array(["a", "b"])) == "BYTES"
    assert datatype_of(np.array([b"a"])) == "BYTES"
    assert datatype_of(np.array([b"a"], dtype=object)) == "BYTES"
    with pytest.raises(InvalidArgument, match="complex128 has no inference-protocol datatype"):
        datatype_of(np.zeros(2, dtype=np.complex128))


def _sample(datatype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    dtype = NUMPY_DTYPE[datatype]
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


@pytest.mark.parametrize("datatype", NUMERIC)
@pytest.mark.parametrize("shape", [(3, 4), (1,), (0, 5), ()])
def test_raw_round_trip_every_numeric_datatype(datatype: str, shape: tuple[int, ...]) -> None:
    array = _sample(datatype, shape, np.random.default_rng(0))
    raw = raw_from_array(array, datatype)
    assert isinstance(raw, bytes)
    assert len(raw) == int(np.prod(shape)) * ITEMSIZE[datatype]
    back = array_from_raw(raw, datatype, shape, "input 'x'")
    assert back.shape == shape
    assert back.dtype == NUMPY_DTYPE[datatype]
    np.testing.assert_array_equal(back, array)
    assert not back.flags.writeable  # a view of the wire bytes, not a copy


def test_raw_form_is_little_endian_and_row_major() -> None:
    array = np.array([[1, 2], [3, 4]], dtype=np.int32)
    assert raw_from_array(array, "INT32") == struct.pack("<4i", 1, 2, 3, 4)
    # A transposed (non-contiguous) view goes out in its logical row-major order.
    assert raw_from_array(array.T, "INT32") == struct.pack("<4i", 1, 3, 2, 4)
    assert raw_from_array(np.array([1.5], dtype=np.float64), "FP64") == struct.pack("<d", 1.5)


def test_raw_size_mismatch_names_tensor_and_expectation() -> None:
    with pytest.raises(
        InvalidArgument, match=r"input 'x': raw contents hold 12 bytes, shape \[2, 2\] of FP32 needs 16"
    ):
        array_from_raw(b"\0" * 12, "FP32", (2, 2), "input 'x'")
    with pytest.raises(InvalidArgument, match=r"input 'x': unknown datatype 'F32'"):
        array_from_raw(b"\0" * 4, "F32", (1,), "input 'x'")


def test_bytes_round_trip() -> None:
    items = [b"", b"a", "héllo", b"\x00\xff" * 300, "x" * 70_000]
    array = np.empty(len(items), dtype=object)
    array[:] = items
    raw = encode_bytes_tensor(array)
    assert raw[:4] == struct.pack("<I", 0)
    assert raw[4:13] == struct.pack("<I", 1) + b"a" + struct.pack("<I", 6)
    back = decode_bytes_tensor(raw, len(items), "input 's'")
    assert back.dtype == object
    assert list(back) == [b"", b"a", "héllo".encode(), b"\x00\xff" * 300, b"x" * 70_000]
    # Through the generic entry points, with a 2-D shape and a numpy string array.
    strings = np.array([["ab", "c"], ["", "dé"]])
    raw2 = raw_from_array(strings, "BYTES")
    back2 = array_from_raw(raw2, "BYTES", (2, 2), "input 's'")
    assert back2.shape == (2, 2)
    assert back2.tolist() == [[b"ab", b"c"], [b"", "dé".encode()]]


def test_bytes_truncated_length_prefix_names_tensor() -> None:
    raw = struct.pack("<I", 1) + b"a" + b"\x02\x00"
    with pytest.raises(
        InvalidArgument, match=r"input 's': BYTES element 1 has a truncated length prefix \(2 bytes left"
    ):
        decode_bytes_tensor(raw, 2, "input 's'")


def test_bytes_over_long_length_prefix_names_tensor() -> None:
    raw = struct.pack("<I", 10) + b"abc"
    with pytest.raises(
        InvalidArgument, match=r"input 's': BYTES element 0 length prefix says 10 bytes but only 3 remain"
    ):
        decode_bytes_tensor(raw, 1, "input 's'")
    huge = struct.pack("<I", 0xFFFFFFFF)
    with pytest.raises(InvalidArgument, match="input 's'"):
        array_from_raw(huge, "BYTES", (1,), "input 's'")


def test_bytes_element_count_must_match_shape() -> None:
    raw = encode_bytes_tensor(np.array([b"a", b"b", b"c"], dtype=object))
    with pytest.raises(InvalidArgument, match=r"input 's': holds 3 BYTES elements, its shape needs 4"):
        array_from_raw(raw, "BYTES", (2, 2), "input 's'")
    with pytest.raises(InvalidArgument, match=r"input 's': holds 0 BYTES elements, its shape needs 1"):
        array_from_raw(b"", "BYTES", (1,), "input 's'")
