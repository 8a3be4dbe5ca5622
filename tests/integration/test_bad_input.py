"""Bad requests get the status code that says what is wrong, with a message naming the field, through
the gateway and straight from the predictor; a fuzzer checks no request makes the predictor fail
internally; and after all of it the services still answer good requests."""

from __future__ import annotations

import asyncio
import math
import struct
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from fresco.api.common.v1 import values_pb2
from fresco.api.gateway.v1 import gateway_pb2
from fresco.api.inference import grpc_service_pb2 as pb
from fresco.api.inference import grpc_service_pb2_grpc as pb_grpc
from fresco.suite import ServiceProcess
from tests.integration import (
    CLIENT_OPTIONS,
    Reference,
    assert_matches_reference,
    bytes_raw,
    decode_outputs,
    features_of,
    infer_request,
)

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


@dataclass(frozen=True)
class Failure:
    code: grpc.StatusCode
    details: str


async def failure(call: Awaitable[object]) -> Failure:
    """How a call that must fail failed."""
    with pytest.raises(aio.AioRpcError) as caught:
        await call
    return Failure(caught.value.code(), caught.value.details() or "")


async def gateway_error(gateway_aio, request: gateway_pb2.PredictRequest) -> Failure:
    return await failure(gateway_aio.Predict(request, timeout=10))


async def predictor_error(predictor_aio, request: pb.ModelInferRequest) -> Failure:
    return await failure(predictor_aio.ModelInfer(request, timeout=30))


def demo_features(sample: np.ndarray, **changes: values_pb2.Value | None) -> dict[str, values_pb2.Value]:
    """The features of a sample row with some replaced (a value) or dropped (None)."""
    features = features_of(sample[0])
    for name, value in changes.items():
        if value is None:
            del features[name]
        else:
            features[name] = value
    return features


# --- through the gateway ---------------------------------------------------------------------


async def test_gateway_unknown_model_is_not_found(gateway_aio, sample: np.ndarray) -> None:
    err = await gateway_error(
        gateway_aio, gateway_pb2.PredictRequest(model="no-such-model", features=features_of(sample[0]))
    )
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in err.details


async def test_gateway_unknown_version_is_not_found(gateway_aio, sample: np.ndarray) -> None:
    err = await gateway_error(
        gateway_aio, gateway_pb2.PredictRequest(model="demo", version="7", features=features_of(sample[0]))
    )
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert "version 7" in err.details


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        pytest.param({"f3": None}, "'f3'", id="missing-feature"),
        pytest.param({"f2": values_pb2.Value(string_value="4.2")}, "'f2'", id="string-for-number"),
        pytest.param({"f5": values_pb2.Value(bytes_value=b"\x00")}, "'f5'", id="bytes-for-number"),
        pytest.param({"f1": values_pb2.Value()}, "'f1'", id="null"),
        pytest.param({"f4": values_pb2.Value(double_list=values_pb2.DoubleList(values=[1, 2]))}, "'f4'", id="list"),
        pytest.param(
            {"f6": values_pb2.Value(string_list=values_pb2.StringList(values=["a"]))}, "'f6'", id="string-list"
        ),
    ],
)
async def test_gateway_bad_feature_is_invalid_argument(
    gateway_aio, sample: np.ndarray, changes: dict[str, values_pb2.Value | None], field: str
) -> None:
    err = await gateway_error(
        gateway_aio, gateway_pb2.PredictRequest(model="demo", features=demo_features(sample, **changes))
    )
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT, err.details
    assert field in err.details


async def test_gateway_empty_model_name_is_invalid_argument(gateway_aio, sample: np.ndarray) -> None:
    err = await gateway_error(gateway_aio, gateway_pb2.PredictRequest(model="", features=features_of(sample[0])))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "request.model" in err.details


@pytest.mark.parametrize("version", ["latest", "\u00b2"], ids=["word", "superscript-digit"])
async def test_gateway_malformed_version_is_invalid_argument(gateway_aio, sample: np.ndarray, version: str) -> None:
    err = await gateway_error(
        gateway_aio, gateway_pb2.PredictRequest(model="demo", version=version, features=features_of(sample[0]))
    )
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT, err.details
    assert "model_version" in err.details


async def test_gateway_entity_keys_without_feature_service_fail_precondition(gateway_aio) -> None:
    key = values_pb2.EntityKey(join_keys={"user_id": values_pb2.Value(int64_value=42)})
    err = await gateway_error(gateway_aio, gateway_pb2.PredictRequest(model="demo", entity_keys=[key]))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "entity_keys" in err.details


async def test_gateway_batch_error_names_the_request(gateway_aio, sample: np.ndarray) -> None:
    requests = [
        gateway_pb2.PredictRequest(model="demo", features=features_of(sample[0])),
        gateway_pb2.PredictRequest(model="demo", features=demo_features(sample, f7=None)),
    ]
    err = await failure(gateway_aio.PredictBatch(gateway_pb2.PredictBatchRequest(requests=requests), timeout=10))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "requests[1]" in err.details
    assert "'f7'" in err.details


async def test_gateway_passes_predictor_rejection_through(gateway_aio, sample: np.ndarray) -> None:
    err = await gateway_error(
        gateway_aio, gateway_pb2.PredictRequest(model="demo", features=features_of(sample[0]), outputs=["logits"])
    )
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'logits'" in err.details


async def test_gateway_takes_batches_over_4_mib(gateway_aio, sample: np.ndarray, reference: Reference) -> None:
    """gRPC's default receive limit is 4 MiB; the gateway takes bigger requests."""
    rows = np.resize(sample, (30_000, 8))
    request = gateway_pb2.PredictBatchRequest(
        requests=[gateway_pb2.PredictRequest(model="demo", features=features_of(row)) for row in rows]
    )
    assert request.ByteSize() > 4 * MIB
    response = await gateway_aio.PredictBatch(request, timeout=60)
    assert len(response.responses) == len(rows)
    expected = reference.predict(rows)
    labels = np.array([answer.outputs["label"].int64_values[0] for answer in response.responses])
    np.testing.assert_array_equal(labels, expected["label"])


# --- straight to the predictor ---------------------------------------------------------------


def x_request(shape: list[int], raw: bytes, datatype: str = "FP32", name: str = "X") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="demo")
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


def echo_request(shape: list[int], raw: bytes) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add(name="text", datatype="BYTES", shape=shape)
    request.raw_input_contents.append(raw)
    return request


async def test_predictor_unknown_model_is_not_found(predictor_aio, sample: np.ndarray) -> None:
    err = await predictor_error(predictor_aio, infer_request(sample[:2], model="no-such-model"))
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in err.details
    err = await failure(predictor_aio.ModelMetadata(pb.ModelMetadataRequest(name="no-such-model")))
    assert err.code == grpc.StatusCode.NOT_FOUND


async def test_predictor_unknown_version_is_not_found(predictor_aio, sample: np.ndarray) -> None:
    err = await predictor_error(predictor_aio, infer_request(sample[:2], version="2"))
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert "version 2" in err.details


@pytest.mark.parametrize(
    "version", ["latest", "-1", "\u00b2", "\u2460"], ids=["word", "negative", "superscript", "circled"]
)
async def test_predictor_malformed_version_is_invalid_argument(predictor_aio, sample: np.ndarray, version: str) -> None:
    err = await predictor_error(predictor_aio, infer_request(sample[:2], version=version))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT, err.details
    assert "model_version" in err.details
    err = await failure(predictor_aio.ModelReady(pb.ModelReadyRequest(name="demo", version=version)))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT, err.details


async def test_predictor_empty_model_name_is_invalid_argument(predictor_aio, sample: np.ndarray) -> None:
    err = await predictor_error(predictor_aio, infer_request(sample[:2], model=""))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT, err.details
    assert "model_name" in err.details


F32 = 4


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        pytest.param(x_request([2, 7], b"\0" * 2 * 7 * F32), ["'X'", "shape [2, 7]"], id="wrong-width"),
        pytest.param(x_request([16], b"\0" * 16 * F32), ["'X'", "shape [16]"], id="wrong-rank"),
        pytest.param(x_request([-2, 8], b""), ["'X'", "negative"], id="negative-dim"),
        pytest.param(x_request([2, 8], b"\0" * 60), ["'X'", "60 bytes"], id="byte-size-mismatch"),
        pytest.param(x_request([2, 8], b"\0" * 2 * 8 * 8, "FP64"), ["'X'", "FP64", "FP32"], id="wrong-dtype"),
        pytest.param(x_request([2, 8], bytes_raw([b"1"] * 16), "BYTES"), ["'X'", "BYTES"], id="bytes-for-fp32"),
        pytest.param(x_request([2, 8], b"\0" * 64, "FP8"), ["'X'", "FP8"], id="unknown-dtype"),
        pytest.param(x_request([2, 8], b"\0" * 64, name="Y"), ["'Y'", "'X'"], id="unknown-input"),
        pytest.param(pb.ModelInferRequest(model_name="demo"), ["['X']"], id="missing-input"),
        pytest.param(x_request([0, 8], b""), [], id="empty-batch"),
    ],
)
async def test_predictor_bad_tensor_is_invalid_argument(
    predictor_aio, request_: pb.ModelInferRequest, words: list[str]
) -> None:
    err = await predictor_error(predictor_aio, request_)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT, err.details
    for word in words:
        assert word in err.details


async def test_predictor_inconsistent_request_is_invalid_argument(predictor_aio, sample: np.ndarray) -> None:
    twice = infer_request(sample[:1])
    twice.inputs.append(twice.inputs[0])
    twice.raw_input_contents.append(twice.raw_input_contents[0])
    err = await predictor_error(predictor_aio, twice)
    assert (err.code, "given twice" in err.details) == (grpc.StatusCode.INVALID_ARGUMENT, True)

    extra_raw = infer_request(sample[:1])
    extra_raw.raw_input_contents.append(b"\0" * 32)
    err = await predictor_error(predictor_aio, extra_raw)
    assert (err.code, "raw_input_contents" in err.details) == (grpc.StatusCode.INVALID_ARGUMENT, True)

    short_typed = infer_request(sample[:2], typed=True)
    del short_typed.inputs[0].contents.fp32_contents[-1]
    err = await predictor_error(predictor_aio, short_typed)
    assert (err.code, "fp32_contents" in err.details) == (grpc.StatusCode.INVALID_ARGUMENT, True)

    unknown_output = infer_request(sample[:1], outputs=["logits"])
    err = await predictor_error(predictor_aio, unknown_output)
    assert (err.code, "'logits'" in err.details) == (grpc.StatusCode.INVALID_ARGUMENT, True)


@pytest.mark.parametrize(
    ("shape", "raw", "words"),
    [
        pytest.param([1], b"\x05\x00", ["truncated length prefix"], id="truncated-prefix"),
        pytest.param([2], bytes_raw([b"ok"]) + struct.pack("<I", 1000) + b"abc", ["1000 bytes"], id="overlong"),
        pytest.param([3], bytes_raw([b"a", b"b"]), ["2 BYTES elements", "needs 3"], id="too-few-elements"),
        pytest.param([1], bytes_raw([b"a", b"b"]), ["2 BYTES elements", "needs 1"], id="too-many-elements"),
    ],
)
async def test_predictor_bad_bytes_tensor_is_invalid_argument(
    predictor_aio, shape: list[int], raw: bytes, words: list[str]
) -> None:
    err = await predictor_error(predictor_aio, echo_request(shape, raw))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT, err.details
    for word in ["'text'", *words]:
        assert word in err.details


async def test_predictor_accepts_messages_over_4_mib(predictor_aio, sample: np.ndarray, reference: Reference) -> None:
    rows = np.resize(sample, (200_000, 8))
    request = infer_request(rows)
    assert 6 * MIB < request.ByteSize() < 64 * MIB
    response = await predictor_aio.ModelInfer(request, timeout=60)
    assert_matches_reference(decode_outputs(response), reference.predict(rows))


async def test_predictor_rejects_messages_over_64_mib(predictor_aio) -> None:
    rows = np.zeros((math.ceil(65 * MIB / 32), 8), dtype=np.float32)
    request = infer_request(rows)
    assert request.ByteSize() > 64 * MIB
    err = await predictor_error(predictor_aio, request)
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED


# --- fuzzing ----------------------------------------------------------------------------------

DATATYPES = ["BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"]
DATATYPES += ["FP16", "FP32", "FP64", "BF16", "BYTES", "", "FP8", "fp32"]
ITEMSIZE = {"BOOL": 1, "INT8": 1, "UINT8": 1, "INT16": 2, "UINT16": 2, "FP16": 2, "BF16": 2, "INT32": 4, "UINT32": 4}
ITEMSIZE |= {"FP32": 4, "INT64": 8, "UINT64": 8, "FP64": 8}
CONTENTS = {"BOOL": "bool_contents", "INT32": "int_contents", "INT64": "int64_contents", "UINT32": "uint_contents"}
CONTENTS |= {"UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
VALUES = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": st.integers(-(2**63), 2**63 - 1),
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": st.binary(max_size=8),
}
MUTATIONS = ["model", "version", "name", "datatype", "shape", "raw", "typed", "extra-input", "no-input"]
MUTATIONS += ["extra-raw", "no-raw", "outputs", "other-model"]


@st.composite
def fuzzed_request(draw: st.DrawFn) -> pb.ModelInferRequest:
    """A request for the demo or echo model that is right, or wrong in one or two ways: another
    model, version, input name, datatype or shape, random or miscounted contents, odd outputs."""
    model = draw(st.sampled_from(["demo", "echo"]))
    mutations = draw(st.sets(st.sampled_from(MUTATIONS), max_size=2))
    name, datatype = ("X", "FP32") if model == "demo" else ("text", "BYTES")
    rows = draw(st.integers(0, 5))
    shape = [rows, 8] if model == "demo" else [rows]
    if "model" in mutations:
        model = draw(st.sampled_from(["nope", "", "demo.", "Demo"]) | st.text(max_size=4))
    version = ""
    if "version" in mutations:
        version = draw(st.sampled_from(["1", "01", "2", "x", "-1", " 1", "1.0"]) | st.text(max_size=2))
    if "name" in mutations:
        name = draw(st.sampled_from(["Y", "", "x", "label"]) | st.text(max_size=3))
    if "datatype" in mutations:
        datatype = draw(st.sampled_from(DATATYPES))
    if "shape" in mutations:
        shape = draw(st.lists(st.integers(-2, 9) | st.sampled_from([2**31, 2**62]), max_size=3))
    if "other-model" in mutations:  # this model's tensor sent to the other one
        model = "demo" if name == "text" else "echo" if name == "X" else model

    request = pb.ModelInferRequest(model_name=model, model_version=version, id=draw(st.text(max_size=4)))
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    count = math.prod(shape) if all(0 <= d <= 64 for d in shape) else draw(st.integers(0, 4))
    if "typed" in mutations and datatype in CONTENTS:
        field = CONTENTS[datatype]
        sized = st.lists(VALUES[field], min_size=count, max_size=count)
        getattr(tensor.contents, field).extend(draw(sized | st.lists(VALUES[field], max_size=6)))
    elif "raw" in mutations:
        request.raw_input_contents.append(draw(st.binary(max_size=80)))
    elif datatype == "BYTES":
        request.raw_input_contents.append(
            bytes_raw(draw(st.lists(st.binary(max_size=6), min_size=count, max_size=count)))
        )
    else:
        size = count * ITEMSIZE.get(datatype, 4)
        request.raw_input_contents.append(draw(st.binary(min_size=size, max_size=size)))
    if "extra-input" in mutations:
        request.inputs.add(name=draw(st.sampled_from(["X", "text", "Z"])), datatype="FP32", shape=[1, 8])
        if request.raw_input_contents:
            request.raw_input_contents.append(b"\0" * 32)
    if "no-input" in mutations:
        del request.inputs[:]
    if "extra-raw" in mutations:
        request.raw_input_contents.append(draw(st.binary(max_size=8)))
    if "no-raw" in mutations:
        del request.raw_input_contents[:]
    if "outputs" in mutations:
        for output in draw(st.lists(st.sampled_from(["label", "probabilities", "echo", "logits", ""]), max_size=3)):
            request.outputs.add(name=output)
    return request


@pytest.fixture(scope="module")
def sync_channel(predictor: ServiceProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(predictor.address, options=CLIENT_OPTIONS) as channel:
        yield channel


def test_fuzzed_infer_requests_never_fail_internally(sync_channel: grpc.Channel) -> None:
    """Whatever a client sends, the predictor answers OK, INVALID_ARGUMENT or NOT_FOUND: never
    INTERNAL, UNKNOWN or UNAVAILABLE, and never a hang."""
    stub = pb_grpc.GRPCInferenceServiceStub(sync_channel)
    outcomes: Counter[str] = Counter()

    # Derandomized (tests/conftest.py), and one explicit example per outcome, so the coverage
    # assertions below never depend on what a random draw happened to reach.
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(request=fuzzed_request())
    @example(request=infer_request(np.zeros((2, 8), np.float32)))
    @example(request=pb.ModelInferRequest(model_name="nope", inputs=[pb.ModelInferRequest.InferInputTensor(name="X")]))
    @example(request=pb.ModelInferRequest(model_name="demo", inputs=[pb.ModelInferRequest.InferInputTensor(name="Y")]))
    def send(request: pb.ModelInferRequest) -> None:
        try:
            response = stub.ModelInfer(request, timeout=10)
        except grpc.RpcError as err:
            code, details = err.code(), err.details()
            outcomes[code.name] += 1
            assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (code, details, request)
            return
        outcomes["OK"] += 1
        assert response.model_name == request.model_name
        assert response.id == request.id
        assert len(response.outputs) == len(response.raw_output_contents) > 0
        for tensor in response.outputs:
            assert tensor.shape[0] == request.inputs[0].shape[0], (tensor, request)

    send()
    # The fuzzer must reach inference as well as every way of rejecting a request.
    assert outcomes["OK"] >= 15, outcomes
    assert outcomes["INVALID_ARGUMENT"] >= 30, outcomes
    assert outcomes["NOT_FOUND"] >= 1, outcomes


def test_predictor_still_serves_after_bad_input(
    sync_channel: grpc.Channel, sample: np.ndarray, reference: Reference
) -> None:
    """Runs after every bad and fuzzed request above: the predictor is healthy, ready and right."""
    health = health_pb2_grpc.HealthStub(sync_channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    stub = pb_grpc.GRPCInferenceServiceStub(sync_channel)
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready is True
    response = stub.ModelInfer(infer_request(sample[:16]), timeout=10)
    assert_matches_reference(decode_outputs(response), reference.predict(sample[:16]))


async def test_gateway_still_serves_after_bad_input(gateway_aio, sample: np.ndarray, reference: Reference) -> None:
    response = await gateway_aio.Predict(gateway_pb2.PredictRequest(model="demo", features=features_of(sample[9])))
    assert list(response.outputs["label"].int64_values) == [reference.predict(sample[9:10])["label"][0]]


# --- Triton's wording, and bounded work per call ----------------------------------------------


async def test_predictor_errors_carry_tritons_wording_first(predictor_aio, sample: np.ndarray) -> None:
    """Triton's clients match on these words; the field-level detail follows them."""
    err = await predictor_error(predictor_aio, infer_request(sample[:2], model="no-such-model"))
    assert err.details.startswith("Request for unknown model: 'no-such-model' is not found; "), err.details
    err = await predictor_error(predictor_aio, infer_request(sample[:2], version="latest"))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details.startswith("failed to get model version from specified version string 'latest'"), err.details


async def test_typed_contents_beside_raw_contents_are_invalid_argument(predictor_aio, sample: np.ndarray) -> None:
    """They used to be ignored: the raw bytes answered whatever the typed values said."""
    request = infer_request(sample[:2])
    request.inputs[0].contents.fp32_contents.extend(np.ones(16).tolist())
    err = await predictor_error(predictor_aio, request)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details.startswith(
        "contents field must not be specified when using raw_input_contents for 'X' for model 'demo'"
    ), err.details


async def test_bytes_elements_per_tensor_are_limited(predictor_aio) -> None:
    err = await predictor_error(predictor_aio, echo_request([(1 << 20) + 1], bytes_raw([b""])))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "1048577 BYTES elements exceed the limit of 1048576 per tensor" in err.details
    assert "max_bytes_elements" in err.details


def in_flight(metrics_url: str, method: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=5) as reply:
        text = reply.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "fresco_rpc_in_flight" and sample.labels.get("method") == method
    )


async def test_decoding_a_large_request_does_not_stall_small_ones(
    repository, tmp_path, sample: np.ndarray, reference: Reference
) -> None:
    """3 million empty strings (12 MiB) take the predictor a few seconds to split. Small calls sent
    once the large one is in the server complete before it does: the splitting no longer holds the
    event loop. The large call asks for an output the model lacks, so its whole time in the server
    is decoding (checked after it)."""
    count = 3_000_000
    service = ServiceProcess(
        "predictor",
        ["--model-repository", str(repository.root), "--port", "0", "--max-bytes-elements", str(count)],
        log_path=tmp_path / "predictor.log",
    ).start()
    try:
        service.wait_healthy()
        async with aio.insecure_channel(service.address, options=CLIENT_OPTIONS) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            large = echo_request([count], b"\0\0\0\0" * count)
            large.outputs.add(name="no-such-output")
            call = asyncio.ensure_future(stub.ModelInfer(large, timeout=120))
            while not await asyncio.to_thread(
                in_flight, service.metrics_url, "/inference.GRPCInferenceService/ModelInfer"
            ):
                assert not call.done(), "the large call finished before it was seen in flight"
                await asyncio.sleep(0.01)
            completed_meanwhile = 0
            while not call.done():
                response = await stub.ModelInfer(infer_request(sample[:1]), timeout=60)
                assert_matches_reference(decode_outputs(response), reference.predict(sample[:1]))
                if not call.done():
                    completed_meanwhile += 1
            with pytest.raises(aio.AioRpcError) as failure:
                await call
            assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "requested output 'no-such-output'" in (failure.value.details() or "")
            assert completed_meanwhile >= 1
    finally:
        service.stop()
