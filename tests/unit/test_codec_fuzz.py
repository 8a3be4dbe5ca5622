"""Fuzzing ModelInferRequest decoding: whatever arrives, decode_inputs either returns arrays that fit
the model's inputs or raises InvalidArgument, never anything else (which callers would see as INTERNAL)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from chassis.errors import InvalidArgument
from chassis.tensors import CONTENTS_FIELD, DATATYPES, NUMPY_DTYPE, encode_bytes_tensor
from fresco.api.inference import grpc_service_pb2 as pb
from predictor.backends.base import TensorSpec
from predictor.codec import decode_inputs

TYPED_SPECS = (
    TensorSpec("X", "FP32", (-1, 4), allow_nan=False),
    TensorSpec("ids", "INT64", (-1,)),
    TensorSpec("text", "BYTES", (-1,)),
    TensorSpec("grid", "INT16", (-1, -1)),
    TensorSpec("flag", "BOOL", (2,)),
)
# FP16 has no typed contents, so a spec set holding it can only succeed in raw form.
RAW_SPECS = (*TYPED_SPECS, TensorSpec("half", "FP16", (-1, 2), allow_nan=False))

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FIELD_VALUES: dict[str, st.SearchStrategy[object]] = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": st.integers(-(2**63), 2**63 - 1),
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": st.binary(max_size=6),
}
DIMS = st.one_of(
    st.sampled_from([0, 1, 2, 4, -1, 2**31, 2**62, 2**63 - 1, -(2**63)]),
    st.integers(-(2**63), 2**63 - 1),
)
NAMES = st.one_of(st.sampled_from([s.name for s in RAW_SPECS]), st.text(max_size=4))
DATATYPE_NAMES = st.one_of(st.sampled_from(sorted(DATATYPES)), st.text(max_size=5))


@dataclass(frozen=True)
class Case:
    specs: tuple[TensorSpec, ...]
    request: pb.ModelInferRequest


PARTS = ("name", "datatype", "shape", "contents")


@st.composite
def _tensor(
    draw: st.DrawFn, spec: TensorSpec, raw: bool, broken: frozenset[str]
) -> tuple[pb.ModelInferRequest.InferInputTensor, bytes | None]:
    """A tensor for `spec`: right for it but for the `broken` parts, which are arbitrary."""
    tensor = pb.ModelInferRequest.InferInputTensor(
        name=draw(NAMES) if "name" in broken else spec.name,
        datatype=draw(DATATYPE_NAMES) if "datatype" in broken else spec.datatype,
    )
    if "shape" in broken:
        shape = draw(st.lists(DIMS, max_size=4))
    else:
        shape = [draw(st.integers(0, 3)) if dim == -1 else dim for dim in spec.shape]
    tensor.shape.extend(shape)
    count = math.prod(shape)
    if not 0 <= count <= 64:  # nonsense shapes still get some contents
        count = draw(st.integers(0, 4))
    if raw:
        if "contents" in broken:
            return tensor, draw(st.binary(max_size=48))
        if spec.datatype == "BYTES":
            items = draw(st.lists(st.binary(max_size=6), min_size=count, max_size=count))
            return tensor, encode_bytes_tensor(np.array([*items, b""], dtype=object)[:count])
        size = count * NUMPY_DTYPE[spec.datatype].itemsize
        return tensor, draw(st.binary(min_size=size, max_size=size))
    if "contents" in broken:
        field = draw(st.sampled_from(sorted(FIELD_VALUES)))
        length = draw(st.integers(0, 6))
    else:
        field, length = CONTENTS_FIELD.get(spec.datatype, "fp32_contents"), count
    getattr(tensor.contents, field).extend(draw(st.lists(FIELD_VALUES[field], min_size=length, max_size=length)))
    return tensor, None


@st.composite
def _broken_parts(draw: st.DrawFn) -> frozenset[str]:
    """Mostly one broken part, sometimes several."""
    return frozenset({draw(st.sampled_from(PARTS))} | draw(st.sets(st.sampled_from(PARTS), max_size=3)))


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """A request for one of the spec sets: mostly right, with a few tensors broken in a few parts."""
    raw = draw(st.booleans())
    specs = RAW_SPECS if raw and draw(st.booleans()) else TYPED_SPECS
    chosen = [spec for spec in specs if draw(st.integers(0, 19)) > 0]  # now and then one is missing
    chosen += draw(st.lists(st.sampled_from(specs), max_size=1))  # now and then one is twice
    chosen = draw(st.permutations(chosen))
    broken = draw(st.lists(st.integers(0, len(chosen) - 1), max_size=2)) if chosen else []
    tensors = [
        draw(_tensor(spec, raw, draw(_broken_parts()) if i in broken else frozenset())) for i, spec in enumerate(chosen)
    ]
    request = pb.ModelInferRequest(model_name=draw(st.text(max_size=4)), id=draw(st.text(max_size=4)))
    for tensor, contents in tensors:
        request.inputs.append(tensor)
        if contents is not None:
            request.raw_input_contents.append(contents)
    if draw(st.integers(0, 19)) == 0:  # a raw count that does not match the inputs
        request.raw_input_contents.append(draw(st.binary(max_size=8)))
    return Case(specs, request)


def _check_decoded(arrays: dict[str, np.ndarray], case: Case) -> None:
    """What a successful decode promises: every input, of its spec's type and shape, holding what was sent."""
    assert set(arrays) == {spec.name for spec in case.specs}
    sent = {tensor.name: (index, tensor) for index, tensor in enumerate(case.request.inputs)}
    for spec in case.specs:
        array = arrays[spec.name]
        assert array.dtype == NUMPY_DTYPE[spec.datatype], spec
        assert len(array.shape) == len(spec.shape), spec
        assert all(want in (-1, got) for got, want in zip(array.shape, spec.shape, strict=True)), spec
        if not spec.allow_nan:
            assert not np.isnan(array).any()
        index, tensor = sent[spec.name]
        assert list(array.shape) == list(tensor.shape)
        if case.request.raw_input_contents:
            if spec.datatype != "BYTES":
                assert array.tobytes() == case.request.raw_input_contents[index]
            continue
        values = list(getattr(tensor.contents, CONTENTS_FIELD[spec.datatype]))
        if array.dtype.kind == "f":
            np.testing.assert_array_equal(array.reshape(-1), np.array(values, dtype=array.dtype))
        else:
            assert array.reshape(-1).tolist() == values, f"{spec.name}: decoded values differ from those sent"


def _decode(case: Case) -> None:
    try:
        arrays = decode_inputs(case.request, case.specs)
    except InvalidArgument as err:
        error = err
    else:
        _check_decoded(arrays, case)
        return
    assert str(error)


# Two requests the fuzzer found, pinned so they are tried on every run.
def _zero_sized_huge() -> Case:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="grid", datatype="INT16", shape=[0, 2**62])
    return Case((TensorSpec("grid", "INT16", (-1, -1)),), request)


def _out_of_range() -> Case:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="grid", datatype="INT16", shape=[1, 1]).contents.int_contents.append(40000)
    return Case((TensorSpec("grid", "INT16", (-1, -1)),), request)


@FUZZ
@given(case=cases())
@example(case=_zero_sized_huge())
@example(case=_out_of_range())
def test_decode_inputs_returns_fitting_arrays_or_invalid_argument(case: Case) -> None:
    _decode(case)


def _seed(raw: bool, grid_values: tuple[int, int] = (1, -1)) -> bytes:
    request = pb.ModelInferRequest(model_name="demo", id="7")
    x = request.inputs.add(name="X", datatype="FP32", shape=[1, 4])
    ids = request.inputs.add(name="ids", datatype="INT64", shape=[2])
    text = request.inputs.add(name="text", datatype="BYTES", shape=[1])
    grid = request.inputs.add(name="grid", datatype="INT16", shape=[1, 2])
    flag = request.inputs.add(name="flag", datatype="BOOL", shape=[2])
    if raw:
        request.raw_input_contents.extend(
            [
                np.ones(4, np.float32).tobytes(),
                np.arange(2, dtype=np.int64).tobytes(),
                encode_bytes_tensor(np.array([b"hi"], dtype=object)),
                np.array([1, 2], dtype=np.int16).tobytes(),
                b"\x00\x01",
            ]
        )
    else:
        x.contents.fp32_contents.extend([1, 2, 3, 4])
        ids.contents.int64_contents.extend([5, 6])
        text.contents.bytes_contents.append(b"hi")
        grid.contents.int_contents.extend(grid_values)
        flag.contents.bool_contents.extend([True, False])
    return request.SerializeToString()


SEEDS = [_seed(raw=True), _seed(raw=False)]


@st.composite
def wire_bytes(draw: st.DrawFn) -> bytes:
    """Arbitrary bytes, or a valid request with a few bytes flipped, cut, or spliced in."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.binary(max_size=200))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        operation = draw(st.sampled_from(["flip", "cut", "splice"]))
        if operation == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif operation == "cut":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


def test_seeds_decode() -> None:
    for seed in SEEDS:
        arrays = decode_inputs(pb.ModelInferRequest.FromString(seed), TYPED_SPECS)
        assert arrays["grid"].tolist() in ([[1, 2]], [[1, -1]])


@FUZZ
@given(data=wire_bytes())
@example(data=_seed(raw=False, grid_values=(1, -2080769)))  # found by the fuzzer: silently wrapped to 16383
def test_decoding_arbitrary_wire_bytes(data: bytes) -> None:
    try:
        request = pb.ModelInferRequest.FromString(data)
    except DecodeError:
        return
    _decode(Case(TYPED_SPECS, request))
