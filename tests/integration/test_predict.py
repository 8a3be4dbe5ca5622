"""Predictions through the gateway and straight from the predictor, checked against ONNX Runtime
run in the test process on the same rows."""

from __future__ import annotations

import re

import grpc
import numpy as np
import pytest
from grpc import aio

from fresco.api.common.v1 import values_pb2
from fresco.api.gateway.v1 import gateway_pb2
from fresco.api.inference import grpc_service_pb2 as pb
from tests.integration import (
    Reference,
    assert_matches_reference,
    bytes_raw,
    decode_outputs,
    features_of,
    infer_request,
)

pytestmark = pytest.mark.integration

TRACE_ID = re.compile(r"^[0-9a-f]{32}$")


def gateway_outputs(response: gateway_pb2.PredictResponse) -> dict[str, np.ndarray]:
    """One gateway answer as arrays, after checking each tensor's datatype and shape."""
    assert set(response.outputs) == {"label", "probabilities"}
    label, probabilities = response.outputs["label"], response.outputs["probabilities"]
    assert (label.datatype, list(label.shape)) == ("INT64", [])
    assert (probabilities.datatype, list(probabilities.shape)) == ("FP32", [2])
    return {
        "label": np.array(label.int64_values, dtype=np.int64).reshape(()),
        "probabilities": np.array(probabilities.double_values),
    }


async def test_gateway_predict_matches_onnxruntime(gateway_aio, sample: np.ndarray, reference: Reference) -> None:
    rows = sample[[0, 1, 2, 17, 99]]
    expected = reference.predict(rows)
    assert len(set(expected["label"].tolist())) == 2, "the rows should cover both classes"
    trace_ids = set()
    for i, row in enumerate(rows):
        response = await gateway_aio.Predict(
            gateway_pb2.PredictRequest(model="demo", features=features_of(row), request_id=f"req-{i}")
        )
        assert_matches_reference(
            gateway_outputs(response),
            {"label": expected["label"][i], "probabilities": expected["probabilities"][i]},
        )
        assert response.model == "demo"
        assert response.model_version == "1"
        assert TRACE_ID.match(response.trace_id), response.trace_id
        assert response.trace_id != "0" * 32
        assert response.request_id == f"req-{i}"
        assert response.fallback is False
        assert response.experiment_arm == ""
        assert (list(response.imputed_features), response.degraded) == ([], False), "named features are not imputed"
        trace_ids.add(response.trace_id)
    assert len(trace_ids) == len(rows), "every request is its own trace"


async def test_gateway_predict_takes_integer_features_and_pinned_version(gateway_aio, reference: Reference) -> None:
    row = [3, -1, 0, 2, 1, -2, 0, 1]
    features = {f"f{i}": values_pb2.Value(int64_value=v) for i, v in enumerate(row)}
    response = await gateway_aio.Predict(gateway_pb2.PredictRequest(model="demo", version="1", features=features))
    expected = reference.predict(np.array([row], dtype=np.float32))
    assert_matches_reference(
        gateway_outputs(response), {"label": expected["label"][0], "probabilities": expected["probabilities"][0]}
    )
    assert response.model_version == "1"


async def test_gateway_predict_restricts_outputs(gateway_aio, sample: np.ndarray, reference: Reference) -> None:
    response = await gateway_aio.Predict(
        gateway_pb2.PredictRequest(model="demo", features=features_of(sample[5]), outputs=["probabilities"])
    )
    assert list(response.outputs) == ["probabilities"]
    np.testing.assert_allclose(
        response.outputs["probabilities"].double_values,
        reference.predict(sample[5:6])["probabilities"][0],
        rtol=1e-5,
        atol=1e-6,
    )


async def test_gateway_predict_batch_answers_in_order(gateway_aio, sample: np.ndarray, reference: Reference) -> None:
    rows = sample[100:150]
    request = gateway_pb2.PredictBatchRequest(
        requests=[
            gateway_pb2.PredictRequest(model="demo", features=features_of(row), request_id=f"row-{i}")
            for i, row in enumerate(rows)
        ]
    )
    response = await gateway_aio.PredictBatch(request)
    assert len(response.responses) == 50
    expected = reference.predict(rows)
    for i, answer in enumerate(response.responses):
        assert answer.request_id == f"row-{i}"
        assert (answer.model, answer.model_version, answer.fallback) == ("demo", "1", False)
        assert TRACE_ID.match(answer.trace_id)
        assert_matches_reference(
            gateway_outputs(answer), {"label": expected["label"][i], "probabilities": expected["probabilities"][i]}
        )
    assert len({answer.trace_id for answer in response.responses}) == 1, "one call, one trace"


async def test_gateway_predict_batch_keeps_order_across_groups(
    gateway_aio, sample: np.ndarray, reference: Reference
) -> None:
    """Requests asking for different outputs go to the predictor in separate groups; the answers
    still come back in request order."""
    rows = sample[150:160]
    requests = []
    for i, row in enumerate(rows):
        outputs = ["label"] if i % 3 == 0 else ["probabilities"] if i % 3 == 1 else []
        requests.append(
            gateway_pb2.PredictRequest(model="demo", features=features_of(row), outputs=outputs, request_id=str(i))
        )
    response = await gateway_aio.PredictBatch(gateway_pb2.PredictBatchRequest(requests=requests))
    expected = reference.predict(rows)
    assert [answer.request_id for answer in response.responses] == [str(i) for i in range(len(rows))]
    for i, answer in enumerate(response.responses):
        wanted = {0: {"label"}, 1: {"probabilities"}, 2: {"label", "probabilities"}}[i % 3]
        assert set(answer.outputs) == wanted
        if "label" in wanted:
            assert list(answer.outputs["label"].int64_values) == [expected["label"][i]]
        if "probabilities" in wanted:
            np.testing.assert_allclose(
                answer.outputs["probabilities"].double_values, expected["probabilities"][i], rtol=1e-5, atol=1e-6
            )


@pytest.mark.parametrize("typed", [False, True], ids=["raw_input_contents", "fp32_contents"])
async def test_predictor_infer_matches_onnxruntime(
    predictor_aio, sample: np.ndarray, reference: Reference, typed: bool
) -> None:
    rows = sample[:32]
    response = await predictor_aio.ModelInfer(infer_request(rows, typed=typed, request_id="abc-123"))
    assert (response.model_name, response.model_version, response.id) == ("demo", "1", "abc-123")
    assert [(t.name, t.datatype, list(t.shape)) for t in response.outputs] == [
        ("label", "INT64", [32]),
        ("probabilities", "FP32", [32, 2]),
    ]
    assert_matches_reference(decode_outputs(response), reference.predict(rows))


async def test_predictor_infer_requested_output_only(predictor_aio, sample: np.ndarray, reference: Reference) -> None:
    response = await predictor_aio.ModelInfer(infer_request(sample[:4], version="1", outputs=["probabilities"]))
    outputs = decode_outputs(response)
    assert list(outputs) == ["probabilities"]
    np.testing.assert_allclose(outputs["probabilities"], reference.predict(sample[:4])["probabilities"], rtol=1e-5)


async def test_predictor_bytes_tensor_round_trips_unchanged(predictor_aio) -> None:
    """A BYTES input reaches the model as the bytes sent: the echo model answers them unchanged,
    whether sent raw or as bytes_contents."""
    items = [b"hello", b"", "gr\u00fc\u00dfe".encode(), b"a,b;c"]
    raw = pb.ModelInferRequest(model_name="echo", id="raw")
    raw.inputs.add(name="text", datatype="BYTES", shape=[len(items)])
    raw.raw_input_contents.append(bytes_raw(items))
    typed = pb.ModelInferRequest(model_name="echo", id="typed")
    typed.inputs.add(name="text", datatype="BYTES", shape=[len(items)]).contents.bytes_contents.extend(items)
    for request in (raw, typed):
        response = await predictor_aio.ModelInfer(request)
        assert [(t.name, t.datatype, list(t.shape)) for t in response.outputs] == [("echo", "BYTES", [len(items)])]
        assert decode_outputs(response)["echo"].tolist() == items, request.id


async def test_model_metadata_names_features(predictor_aio) -> None:
    metadata = await predictor_aio.ModelMetadata(pb.ModelMetadataRequest(name="demo"))
    assert metadata.name == "demo"
    assert list(metadata.versions) == ["1"]
    assert metadata.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("X", "FP32", [-1, 8])]
    assert metadata.inputs[0].parameters["feature_names"].string_param == ",".join(f"f{i}" for i in range(8))
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("label", "INT64", [-1]),
        ("probabilities", "FP32", [-1, 2]),
    ]
    pinned = await predictor_aio.ModelMetadata(pb.ModelMetadataRequest(name="demo", version="1"))
    assert pinned == metadata


async def test_server_and_model_readiness(predictor_aio) -> None:
    assert (await predictor_aio.ServerLive(pb.ServerLiveRequest())).live is True
    assert (await predictor_aio.ServerReady(pb.ServerReadyRequest())).ready is True
    assert (await predictor_aio.ModelReady(pb.ModelReadyRequest(name="demo"))).ready is True
    assert (await predictor_aio.ModelReady(pb.ModelReadyRequest(name="demo", version="1"))).ready is True
    assert (await predictor_aio.ModelReady(pb.ModelReadyRequest(name="echo"))).ready is True


async def test_server_metadata(predictor_aio) -> None:
    metadata = await predictor_aio.ServerMetadata(pb.ServerMetadataRequest())
    assert metadata.name == "fresco-predictor"
    assert re.match(r"^\d+\.\d+\.\d+", metadata.version), metadata.version
    assert "model_repository" in metadata.extensions


async def test_repository_index_lists_ready_models(predictor_aio) -> None:
    index = await predictor_aio.RepositoryIndex(pb.RepositoryIndexRequest())
    assert [(m.name, m.version, m.state, m.reason) for m in index.models] == [
        ("demo", "1", "READY", ""),
        ("echo", "1", "READY", ""),
    ]
    ready_only = await predictor_aio.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert ready_only == index


async def test_model_statistics_count_inferences(predictor_aio, sample: np.ndarray, repository) -> None:
    async def stats() -> pb.ModelStatistics:
        response = await predictor_aio.ModelStatistics(pb.ModelStatisticsRequest(name="demo", version="1"))
        assert len(response.model_stats) == 1
        version_stats: pb.ModelStatistics = response.model_stats[0]
        return version_stats

    before = await stats()
    for start in (0, 4, 8):
        await predictor_aio.ModelInfer(infer_request(sample[start : start + 4]))
    with pytest.raises(aio.AioRpcError):
        await predictor_aio.ModelInfer(infer_request(sample[:4, :7]))  # wrong shape: a failed request
    after = await stats()
    assert (after.name, after.version) == ("demo", "1")
    assert after.inference_count - before.inference_count == 12
    assert after.execution_count - before.execution_count == 3
    assert after.inference_stats.success.count - before.inference_stats.success.count == 3
    assert after.inference_stats.success.ns > before.inference_stats.success.ns
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1
    assert after.inference_stats.compute_infer.count - before.inference_stats.compute_infer.count == 3
    assert after.last_inference >= before.last_inference > 0
    batch4 = {b.batch_size: b for b in after.batch_stats}[4]
    assert batch4.compute_infer.count >= 3
    assert [(m.type, m.byte_size) for m in after.memory_usage] == [("CPU", repository.demo.path.stat().st_size)]
    everything = await predictor_aio.ModelStatistics(pb.ModelStatisticsRequest())
    assert [(s.name, s.version) for s in everything.model_stats] == [("demo", "1"), ("echo", "1")]


async def test_stream_infer_answers_each_request_and_survives_a_bad_one(
    predictor_aio, sample: np.ndarray, reference: Reference
) -> None:
    requests = [
        infer_request(sample[:3], request_id="first"),
        infer_request(sample[:3, :5], request_id="bad-shape"),
        infer_request(sample[:3], model="no-such-model", request_id="bad-model"),
        infer_request(sample[3:5], typed=True, request_id="last"),
    ]
    call = predictor_aio.ModelStreamInfer()
    answers = []
    for request in requests:  # one at a time: each answer must come before the stream ends
        await call.write(request)
        answers.append(await call.read())
    await call.done_writing()
    assert await call.read() is aio.EOF
    assert await call.code() == grpc.StatusCode.OK

    first, bad_shape, bad_model, last = answers
    assert first.error_message == ""
    assert first.infer_response.id == "first"
    assert_matches_reference(decode_outputs(first.infer_response), reference.predict(sample[:3]))
    assert bad_shape.infer_response.id == "bad-shape"
    assert "shape" in bad_shape.error_message
    assert "'X'" in bad_shape.error_message
    assert bad_model.infer_response.id == "bad-model"
    assert "no-such-model" in bad_model.error_message
    assert last.error_message == ""
    assert last.infer_response.id == "last"
    assert_matches_reference(decode_outputs(last.infer_response), reference.predict(sample[3:5]))
