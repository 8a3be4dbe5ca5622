"""Decoding ModelInferRequest tensors against a model's inputs, and encoding answers."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from chassis.errors import InvalidArgument
from chassis.tensors import array_from_raw, encode_bytes_tensor
from fresco.api.inference import grpc_service_pb2 as pb
from predictor.backends.base import TensorSpec
from predictor.codec import decode_cost, decode_inputs, encode_response, requested_outputs

X = TensorSpec("X", "FP32", (-1, 4))
IDS = TensorSpec("ids", "INT64", (-1,))
TEXT = TensorSpec("text", "BYTES", (-1,))
SPECS = (X, IDS, TEXT)
OUTPUTS = (TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 2)))

X_VALUES = np.arange(8, dtype=np.float32).reshape(2, 4) / 4
IDS_VALUES = np.array([7, -(2**40)], dtype=np.int64)
TEXT_VALUES = [b"caf\xc3\xa9", b""]


def _raw_request(skip: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="demo", id="req-1")
    tensors = {
        "X": ("FP32", [2, 4], X_VALUES.tobytes()),
        "ids": ("INT64", [2], IDS_VALUES.tobytes()),
        "text": ("BYTES", [2], encode_bytes_tensor(np.array(TEXT_VALUES, dtype=object))),
    }
    for name, (datatype, shape, raw) in tensors.items():
        if name != skip:
            request.inputs.add(name=name, datatype=datatype, shape=shape)
            request.raw_input_contents.append(raw)
    return request


def _typed_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="demo")
    x = request.inputs.add(name="X", datatype="FP32", shape=[2, 4])
    x.contents.fp32_contents.extend(X_VALUES.reshape(-1).tolist())
    ids = request.inputs.add(name="ids", datatype="INT64", shape=[2])
    ids.contents.int64_contents.extend(IDS_VALUES.tolist())
    text = request.inputs.add(name="text", datatype="BYTES", shape=[2])
    text.contents.bytes_contents.extend(TEXT_VALUES)
    return request


def _check_decoded(arrays: dict[str, np.ndarray]) -> None:
    assert list(arrays) == ["X", "ids", "text"]
    assert arrays["X"].dtype == np.float32
    np.testing.assert_array_equal(arrays["X"], X_VALUES)
    assert arrays["ids"].dtype == np.int64
    np.testing.assert_array_equal(arrays["ids"], IDS_VALUES)
    assert arrays["text"].dtype == object
    assert arrays["text"].shape == (2,)
    assert list(arrays["text"]) == TEXT_VALUES


def test_raw_contents_decode() -> None:
    _check_decoded(decode_inputs(_raw_request(), SPECS))


def test_typed_contents_decode() -> None:
    _check_decoded(decode_inputs(_typed_request(), SPECS))


def test_inputs_may_come_in_any_order() -> None:
    request = _raw_request()
    reordered = pb.ModelInferRequest(model_name="demo")
    for index in (2, 0, 1):
        reordered.inputs.append(request.inputs[index])
        reordered.raw_input_contents.append(request.raw_input_contents[index])
    arrays = decode_inputs(reordered, SPECS)
    np.testing.assert_array_equal(arrays["X"], X_VALUES)
    assert list(arrays["text"]) == TEXT_VALUES


@pytest.mark.parametrize(
    ("datatype", "field", "values", "dtype"),
    [
        ("BOOL", "bool_contents", [True, False, True], np.bool_),
        ("INT8", "int_contents", [-128, 0, 127], np.int8),
        ("INT16", "int_contents", [-300, 0, 300], np.int16),
        ("INT32", "int_contents", [-(2**31), 0, 2**31 - 1], np.int32),
        ("UINT8", "uint_contents", [0, 1, 255], np.uint8),
        ("UINT16", "uint_contents", [0, 1, 65535], np.uint16),
        ("UINT32", "uint_contents", [0, 1, 2**32 - 1], np.uint32),
        ("UINT64", "uint64_contents", [0, 1, 2**64 - 1], np.uint64),
        ("FP64", "fp64_contents", [0.1, -2.5, 1e300], np.float64),
    ],
)
def test_typed_contents_of_each_datatype(datatype: str, field: str, values: list[object], dtype: type) -> None:
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="v", datatype=datatype, shape=[3])
    getattr(tensor.contents, field).extend(values)
    (array,) = decode_inputs(request, [TensorSpec("v", datatype, (3,))]).values()
    assert array.dtype == dtype
    assert array.tolist() == values


def _error(request: pb.ModelInferRequest, specs: tuple[TensorSpec, ...] = SPECS) -> str:
    with pytest.raises(InvalidArgument) as caught:
        decode_inputs(request, specs)
    return str(caught.value)


def test_shape_mismatch() -> None:
    request = _raw_request()
    request.inputs[0].shape[:] = [1, 8]
    assert _error(request) == "input 'X': shape [1, 8] does not match the model's [-1, 4]"
    request.inputs[0].shape[:] = [8]
    assert _error(request) == "input 'X': shape [8] does not match the model's [-1, 4]"


def test_negative_dimension() -> None:
    request = _raw_request()
    request.inputs[0].shape[:] = [-2, 4]
    assert _error(request) == "input 'X': shape [-2, 4] has a negative dimension"


def test_byte_size_mismatch() -> None:
    request = _raw_request()
    request.raw_input_contents[0] = request.raw_input_contents[0][:-1]
    assert _error(request) == "input 'X': raw contents hold 31 bytes, shape [2, 4] of FP32 needs 32"


def test_wrong_datatype() -> None:
    request = _raw_request()
    request.inputs[1].datatype = "INT32"
    assert _error(request) == "input 'ids': datatype INT32 but the model expects INT64"
    request.inputs[1].datatype = ""
    assert _error(request) == "input 'ids': datatype (empty) but the model expects INT64"


def test_missing_input() -> None:
    assert _error(_raw_request(skip="ids")) == "model 'demo' needs inputs ['ids'], which the request lacks"


def test_unknown_input() -> None:
    request = _raw_request()
    request.inputs.add(name="extra", datatype="FP32", shape=[1])
    request.raw_input_contents.append(b"\0" * 4)
    message = _error(request)
    assert message == "input 'extra' is not an input of model 'demo'; it takes ['X', 'ids', 'text']"


def test_duplicate_input() -> None:
    request = _raw_request()
    request.inputs.append(request.inputs[0])
    request.raw_input_contents.append(request.raw_input_contents[0])
    assert _error(request) == "input 'X' is given twice"


def test_raw_count_mismatch() -> None:
    request = _raw_request()
    del request.raw_input_contents[2]
    assert _error(request).startswith("raw_input_contents has 2 entries but inputs has 3")


def test_typed_count_mismatch() -> None:
    request = _typed_request()
    del request.inputs[0].contents.fp32_contents[-1]
    assert _error(request) == "input 'X': fp32_contents holds 7 values, shape [2, 4] needs 8"


def test_typed_contents_in_the_wrong_field_count_as_missing() -> None:
    request = _typed_request()
    request.inputs[1].contents.ClearField("int64_contents")
    request.inputs[1].contents.int_contents.extend([1, 2])
    assert _error(request) == "input 'ids': int64_contents holds 0 values, shape [2] needs 2"


@pytest.mark.parametrize(
    ("datatype", "field", "values"),
    [("INT8", "int_contents", [1, 300]), ("UINT8", "uint_contents", [256]), ("INT16", "int_contents", [-40000])],
)
def test_typed_value_out_of_range(datatype: str, field: str, values: list[int]) -> None:
    """The protocol carries INT8/INT16 in int32 and UINT8/UINT16 in uint32 fields; a value that does not
    fit the model's type must be refused, not silently wrapped (300 would reach the model as 44)."""
    request = pb.ModelInferRequest(model_name="m")
    getattr(request.inputs.add(name="small", datatype=datatype, shape=[len(values)]).contents, field).extend(values)
    message = _error(request, (TensorSpec("small", datatype, (len(values),)),))
    assert message == f"input 'small': a value in {field} does not fit {datatype}"


def test_bytes_bad_length_prefix() -> None:
    request = _raw_request()
    request.raw_input_contents[2] = struct.pack("<I", 99) + b"short"
    assert _error(request) == "input 'text': BYTES element 0 length prefix says 99 bytes but only 5 remain"
    request.raw_input_contents[2] = struct.pack("<I", 1) + b"a" + b"\x01"
    assert "input 'text': BYTES element 1 has a truncated length prefix" in _error(request)


def test_nan_when_not_allowed() -> None:
    strict = (TensorSpec("X", "FP32", (-1, 4), allow_nan=False), IDS, TEXT)
    request = _raw_request()
    assert decode_inputs(request, strict)["X"].shape == (2, 4)
    values = X_VALUES.copy()
    values[1, 2] = np.nan
    request.raw_input_contents[0] = values.tobytes()
    assert _error(request, strict) == "input 'X': contains NaN, which this model's config forbids"
    assert np.isnan(decode_inputs(request, SPECS)["X"][1, 2])  # allowed by default


def test_nan_in_typed_half_precision_raw_input() -> None:
    spec = TensorSpec("h", "FP16", (2,), allow_nan=False)
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="h", datatype="FP16", shape=[2])
    request.raw_input_contents.append(np.array([1.0, np.nan], dtype=np.float16).tobytes())
    assert _error(request, (spec,)) == "input 'h': contains NaN, which this model's config forbids"


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_half_floats_via_typed_contents(datatype: str) -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="h", datatype=datatype, shape=[2]).contents.fp32_contents.extend([1.0, 2.0])
    message = _error(request, (TensorSpec("h", datatype, (2,)),))
    assert message == f"input 'h': {datatype} has no typed contents; send it in raw_input_contents"
    # The raw form works.
    raw = pb.ModelInferRequest(model_name="m")
    raw.inputs.add(name="h", datatype=datatype, shape=[2])
    raw.raw_input_contents.append(np.array([1.0, 2.0], dtype=np.float16).tobytes())
    assert decode_inputs(raw, (TensorSpec("h", datatype, (2,)),))["h"].shape == (2,)


def test_zero_sized_tensor_with_huge_dimension_is_invalid_argument() -> None:
    """Found by the fuzz test: a shape like [0, 2**62] passes the shape and size checks (0 elements,
    0 bytes) but numpy cannot describe it, so the reshape raises ValueError (an INTERNAL to callers)."""
    raw = pb.ModelInferRequest(model_name="m")
    raw.inputs.add(name="grid", datatype="FP32", shape=[0, 2**62])
    raw.raw_input_contents.append(b"")
    with pytest.raises(InvalidArgument, match="input 'grid'"):
        decode_inputs(raw, (TensorSpec("grid", "FP32", (-1, -1)),))
    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="grid", datatype="INT8", shape=[2**62, 2**62, 0])
    with pytest.raises(InvalidArgument, match="input 'grid'"):
        decode_inputs(typed, (TensorSpec("grid", "INT8", (-1, -1, -1)),))


def test_requested_outputs() -> None:
    request = pb.ModelInferRequest(model_name="demo")
    assert requested_outputs(request, OUTPUTS) == ["label", "probabilities"]
    request.outputs.add(name="probabilities")
    assert requested_outputs(request, OUTPUTS) == ["probabilities"]
    request.outputs.add(name="logits")
    with pytest.raises(
        InvalidArgument,
        match=r"requested output 'logits' is not an output of the model; it has \['label', 'probabilities'\]",
    ):
        requested_outputs(request, OUTPUTS)


def test_encode_response_round_trip() -> None:
    request = pb.ModelInferRequest(model_name="demo", model_version="", id="abc-123")
    label = np.array([1, 0, 1], dtype=np.int64)
    probabilities = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], dtype=np.float32)
    names = np.array([b"yes", b"no", b"yes"], dtype=object)
    response = encode_response(
        request,
        "2",
        {"probabilities": probabilities, "label": label, "names": names},
        {"label": "INT64", "probabilities": "FP32", "names": "BYTES"},
    )
    wire = pb.ModelInferResponse.FromString(response.SerializeToString())
    assert (wire.model_name, wire.model_version, wire.id) == ("demo", "2", "abc-123")
    assert [(o.name, o.datatype, list(o.shape)) for o in wire.outputs] == [
        ("probabilities", "FP32", [3, 2]),
        ("label", "INT64", [3]),
        ("names", "BYTES", [3]),
    ]
    assert len(wire.raw_output_contents) == 3
    assert wire.raw_output_contents[0] == probabilities.tobytes()
    assert wire.raw_output_contents[1] == label.tobytes()
    originals: tuple[np.ndarray, ...] = (probabilities, label, names)
    for output, raw, original in zip(wire.outputs, wire.raw_output_contents, originals, strict=True):
        back = array_from_raw(raw, output.datatype, tuple(output.shape), output.name)
        assert back.tolist() == original.tolist()


def test_typed_contents_beside_raw_contents_are_refused_in_tritons_words() -> None:
    """They used to be ignored silently: the raw bytes answered, whatever the typed values said."""
    request = _raw_request()
    request.inputs[1].contents.int64_contents.extend([1, 2])
    assert _error(request) == (
        "contents field must not be specified when using raw_input_contents for 'ids' for model 'demo'; "
        "send each input either typed or raw"
    )


def test_bytes_elements_per_tensor_are_limited_naming_the_setting() -> None:
    request = _raw_request()
    assert list(decode_inputs(request, SPECS, max_bytes_elements=2)["text"]) == TEXT_VALUES
    with pytest.raises(InvalidArgument) as caught:
        decode_inputs(request, SPECS, max_bytes_elements=1)
    assert str(caught.value) == (
        "input 'text': 2 BYTES elements exceed the limit of 1 per tensor "
        "(setting max_bytes_elements, FRESCO_PREDICTOR_MAX_BYTES_ELEMENTS)"
    )
    typed = _typed_request()
    with pytest.raises(InvalidArgument, match="2 BYTES elements exceed the limit of 1 per tensor"):
        decode_inputs(typed, SPECS, max_bytes_elements=1)


def test_a_raw_bytes_tensor_holding_more_than_its_shape_stops_early() -> None:
    """Splitting stops one element past the shape, so a small shape bounds the work whatever the
    sender packed behind it."""
    request = _raw_request()
    request.raw_input_contents[2] = encode_bytes_tensor(np.array([b""] * 100_000, dtype=object))
    assert _error(request) == "input 'text': holds at least 3 BYTES elements, its shape needs 2"


def test_decode_cost_counts_what_is_walked_element_by_element() -> None:
    raw = _raw_request()
    assert decode_cost(raw) == len(raw.raw_input_contents[2])  # numeric raw contents cost nothing
    assert decode_cost(_typed_request()) == 8 * (8 + 2 + 2)


def test_a_tensor_built_in_another_feature_order_is_refused() -> None:
    """The gateway names the order it built a feature tensor in; after a reload that reordered the
    features under the same shape, that tensor would be read column by column in the wrong order."""
    named = (TensorSpec("X", "FP32", (-1, 4), features=("a", "b", "c", "d")), IDS, TEXT)
    request = _raw_request()
    assert decode_inputs(request, named)["X"].shape == (2, 4)  # no order named: taken as sent
    request.inputs[0].parameters["feature_names"].string_param = "a,b,c,d"
    np.testing.assert_array_equal(decode_inputs(request, named)["X"], X_VALUES)
    request.inputs[0].parameters["feature_names"].string_param = "d,c,b,a"
    assert _error(request, named) == (
        "input 'X': parameters['feature_names'] says its columns are [d,c,b,a], but this version of the model "
        "reads [a,b,c,d]; build the tensor again from the model's metadata"
    )
    assert decode_inputs(request, SPECS)["X"].shape == (2, 4)  # a model without named features: nothing to check
