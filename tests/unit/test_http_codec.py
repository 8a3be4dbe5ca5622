"""The REST form's JSON and binary bodies as the gRPC messages the servicer takes: every datatype's
elements round-trip bit for bit, elements of the wrong kind or out of range are refused naming the
field, and binary tensors are cut from the body where the JSON says."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from chassis.errors import InvalidArgument
from fresco.api.inference import grpc_service_pb2 as pb
from predictor.http_codec import (
    decode_infer_request,
    encode_infer_response,
    json_from_raw,
    load_request,
    message_json,
    raw_from_json,
    repository_index_request,
)
from predictor.http_server import HttpCall

NUMERIC = ["BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "FP16", "FP32", "FP64"]
CODES = ["?", "<i1", "<i2", "<i4", "<i8", "<u1", "<u2", "<u4", "<u8", "<f2", "<f4", "<f8"]
DTYPES = {name: np.dtype(code) for name, code in zip(NUMERIC, CODES, strict=True)}


@st.composite
def tensors(draw: st.DrawFn) -> tuple[str, np.ndarray]:
    datatype = draw(st.sampled_from(NUMERIC))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4))
    elements = hnp.from_dtype(DTYPES[datatype], allow_nan=False) if datatype.startswith("FP") else None
    return datatype, draw(hnp.arrays(DTYPES[datatype], shape, elements=elements))


@given(tensors())
def test_json_data_round_trips_bit_for_bit(case: tuple[str, np.ndarray]) -> None:
    datatype, array = case
    raw = array.tobytes()
    data = json_from_raw(raw, datatype, list(array.shape), "output")
    assert raw_from_json(json.loads(json.dumps(data)), datatype, list(array.shape), "inputs[0].data") == raw
    # Nested (row-major) data is the same tensor.
    assert raw_from_json(array.tolist(), datatype, list(array.shape), "inputs[0].data") == raw


def test_bytes_and_bf16() -> None:
    raw = raw_from_json(["", "héllo"], "BYTES", [2], "d")
    assert raw == struct.pack("<I", 0) + struct.pack("<I", 6) + "héllo".encode()
    assert json_from_raw(raw, "BYTES", [2], "o") == ["", "héllo"]
    bf16 = np.array([0x3F80, 0xC000], dtype="<u2").tobytes()  # 1.0, -2.0
    assert json_from_raw(bf16, "BF16", [2], "o") == [1.0, -2.0]
    with pytest.raises(InvalidArgument, match=r"inputs\[0\].data: JSON has no bfloat16"):
        raw_from_json([1.0], "BF16", [1], "inputs[0].data")
    with pytest.raises(InvalidArgument, match=r"not UTF-8 text.*binary_data"):
        json_from_raw(struct.pack("<I", 1) + b"\xff", "BYTES", [1], "output 'o'")


@pytest.mark.parametrize(
    ("data", "datatype", "message"),
    [
        ([True, 1], "INT32", "INT32 elements are integers, got true"),
        ([1.5, 1], "INT32", "INT32 elements are integers, got 1.5"),
        ([300, 1], "INT8", "a value is outside INT8's range [-128, 127]"),
        ([-1, 1], "UINT64", "outside UINT64's range"),
        ([1, 0], "BOOL", "BOOL elements are true or false, got 1"),
        (["1.5", 1.0], "FP32", 'FP32 elements are numbers, got "1.5"'),
        ([70000.0, 1.0], "FP16", "a value is outside FP16's range"),
        ([10**400, 1], "FP64", "a value is outside FP64's range"),
        ([None, 1.0], "FP64", "FP64 elements are numbers, got null"),
        ([1, "a"], "BYTES", "BYTES elements are strings, got 1"),
        (["\ud800", "a"], "BYTES", "a lone surrogate"),
        ([1.0], "FP32", "holds 1 elements, shape [2] needs 2"),
        ({"a": 1}, "FP32", "expected a JSON array, got an object"),
    ],
)
def test_bad_elements_are_refused_naming_the_field(data: object, datatype: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        raw_from_json(data, datatype, [2], "inputs[3].data")
    assert str(caught.value).startswith("inputs[3].data: "), caught.value
    assert message in str(caught.value)


def body(document: dict[str, object], *binary: bytes) -> tuple[bytes, str | None]:
    header = json.dumps(document).encode()
    return header + b"".join(binary), str(len(header)) if binary else None


def test_binary_inputs_are_cut_where_the_json_says() -> None:
    first, second = np.arange(4, dtype="<f4"), np.array([True, False, True])
    document = {
        "id": "r1",
        "parameters": {"binary_data_output": True, "timeout": 2_000_000, "priority": 3},
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [2, 2], "parameters": {"binary_data_size": 16}},
            {"name": "b", "datatype": "BOOL", "shape": [3], "parameters": {"binary_data_size": 3}},
            {"name": "c", "datatype": "INT64", "shape": [1], "data": [7], "parameters": {"feature_names": "x"}},
        ],
        "outputs": [{"name": "y", "parameters": {"binary_data": False}}, {"name": "z"}],
    }
    call = decode_infer_request("m", "2", *body(document, first.tobytes(), second.tobytes()))
    request = call.request
    assert (request.model_name, request.model_version, request.id) == ("m", "2", "r1")
    assert list(request.raw_input_contents) == [first.tobytes(), second.tobytes(), np.int64(7).tobytes()]
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [
        ("a", "FP32", [2, 2]), ("b", "BOOL", [3]), ("c", "INT64", [1]),
    ]  # fmt: skip
    assert request.inputs[2].parameters["feature_names"].string_param == "x"
    assert request.parameters["priority"].int64_param == 3
    assert (call.timeout_s, call.binary("y"), call.binary("z")) == (2.0, False, True)


@pytest.mark.parametrize(
    ("document", "tail", "length", "message"),
    [
        ({"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 8}}]},
         b"1234", None, "inputs[0].parameters.binary_data_size: 8 bytes, but 4 bytes of binary data remain"),
        ({"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
         b"1234", None, "request body: 4 bytes follow the JSON"),
        ({"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [1.0],
                      "parameters": {"binary_data_size": 4}}]},
         b"1234", None, "inputs[0]: give either data or parameters.binary_data_size, not both"),
        ({"inputs": [{"name": "a", "datatype": "FP32", "shape": [1]}]}, b"", None, "inputs[0]: expected data"),
        ({"inputs": [{"name": "a", "datatype": "F32", "shape": [1], "data": [1]}]}, b"", None,
         "inputs[0].datatype: expected one of BF16, BOOL"),
        ({"inputs": [{"name": "a", "datatype": "FP32", "shape": [1 << 63], "data": []}]}, b"", None,
         "inputs[0].shape: expected a non-negative integer"),
        ({"inputs": [], "outputs": [{"name": "y", "parameters": {"classification": 3}}]}, b"", None,
         "outputs[0].parameters.classification: the classification extension is not served here"),
        ({"inputs": [{"name": "a", "datatype": "FP32", "shape": [1],
                      "parameters": {"shared_memory_region": "r"}}]}, b"", None,
         "inputs[0].parameters.shared_memory_region: the shared-memory extension is not served here"),
        ({"inputs": [], "model_name": "other"}, b"", None, "model_name: 'other' differs from the URL's 'm'"),
        ({"inputs": [], "parameters": {"timeout": -1}}, b"", None, "parameters.timeout: expected a non-negative"),
        ({"inputs": []}, b"", "99", "Inference-Header-Content-Length header: expected the JSON's length"),
    ],
)  # fmt: skip
def test_malformed_requests_name_the_field(
    document: dict[str, object], tail: bytes, length: str | None, message: str
) -> None:
    header = json.dumps(document).encode()
    with pytest.raises(InvalidArgument) as caught:
        decode_infer_request("m", "", header + tail, length or (str(len(header)) if tail else None))
    assert message in str(caught.value)


def test_answers_in_json_or_binary_as_asked() -> None:
    response = pb.ModelInferResponse(model_name="m", model_version="1", id="r1")
    response.outputs.add(name="y", datatype="FP32", shape=[2])
    response.raw_output_contents.append(np.array([0.5, -1.0], dtype="<f4").tobytes())
    response.outputs.add(name="z", datatype="INT64", shape=[1, 1])
    response.raw_output_contents.append(np.array([[3]], dtype="<i8").tobytes())
    payload, length = encode_infer_response(response, lambda name: False)
    assert length is None
    assert json.loads(payload) == {
        "model_name": "m", "model_version": "1", "id": "r1",
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [2], "data": [0.5, -1.0]},
                    {"name": "z", "datatype": "INT64", "shape": [1, 1], "data": [3]}],
    }  # fmt: skip
    payload, length = encode_infer_response(response, lambda name: name == "y")
    assert length is not None
    header = json.loads(payload[:length])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert "data" not in header["outputs"][0]
    assert payload[length:] == response.raw_output_contents[0]


def test_messages_in_the_rest_form() -> None:
    stats = pb.ModelStatisticsResponse()
    model = stats.model_stats.add(name="m", version="1", inference_count=5, last_inference=1 << 40)
    model.inference_stats.success.count = 2
    model.batch_stats.add(batch_size=4).compute_infer.ns = 99
    document = message_json(stats)["model_stats"][0]
    assert (document["inference_count"], document["last_inference"]) == (5, 1 << 40)  # numbers, not strings
    assert document["inference_stats"]["success"] == {"count": 2, "ns": 0}
    assert document["batch_stats"][0]["compute_infer"] == {"count": 0, "ns": 99}
    metadata = pb.ModelMetadataResponse(name="m", versions=["1"], platform="onnxruntime_onnx")
    metadata.parameters["version"].string_param = "1"
    metadata.inputs.add(name="X", datatype="FP32", shape=[-1, 8])
    document = message_json(metadata)
    assert document["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 8], "parameters": {}}]
    assert document["parameters"] == {"version": "1"}


def test_repository_bodies() -> None:
    assert repository_index_request(b"").ready is False
    assert repository_index_request(b'{"ready": true}').ready is True
    with pytest.raises(InvalidArgument, match="ready: expected true or false"):
        repository_index_request(b'{"ready": "yes"}')
    model = b"\x00\x01onnx"
    document = {"parameters": {"config": "{}", "file:1/model.onnx": base64.b64encode(model).decode()}}
    request = load_request("m", json.dumps(document).encode())
    assert request.parameters["file:1/model.onnx"].bytes_param == model
    assert request.parameters["config"].string_param == "{}"
    with pytest.raises(InvalidArgument, match=r"parameters\['file:1/model.onnx'\]: expected the file's bytes"):
        load_request("m", b'{"parameters": {"file:1/model.onnx": "not base64!"}}')


def test_an_http_call_carries_its_timeout_as_the_deadline_and_no_metadata() -> None:
    call = decode_infer_request("m", "", b'{"inputs": [], "parameters": {"timeout": 0}}', None)
    assert call.timeout_s is None  # 0: no deadline, as in Triton
    assert HttpCall(None).time_remaining() is None
    remaining = HttpCall(5.0).time_remaining()
    assert remaining is not None
    assert 0 < remaining <= 5.0
    # Never a sibling's call: the servicer must not take an HTTP caller's headers for forwarding marks.
    assert HttpCall(1.0).invocation_metadata() == ()
