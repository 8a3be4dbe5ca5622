"""Dynamic batching through the real server: under 64 concurrent clients, requests are batched
together and still each get exactly the answers ONNX Runtime gives for their own rows.

The predictor here runs every batch on its inference thread (`--inline-below-us 0`). With the
default, a model as fast as the demo one runs on the event loop and may honestly finish each
request before the next is read, so whether two requests ever share a batch would be chance."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
from grpc import aio

from fresco.api.inference import grpc_service_pb2 as pb
from fresco.api.inference import grpc_service_pb2_grpc as pb_grpc
from fresco.suite import ServiceProcess
from tests.integration import (
    CLIENT_OPTIONS,
    Reference,
    assert_matches_reference,
    decode_outputs,
    infer_request,
    write_slow_model,
)
from tests.integration.conftest import Repository

pytestmark = pytest.mark.integration

CLIENTS = 64
REQUESTS_PER_CLIENT = 5


async def demo_statistics(stub: pb_grpc.GRPCInferenceServiceAsyncStub) -> pb.ModelStatistics:
    response = await stub.ModelStatistics(pb.ModelStatisticsRequest(name="demo", version="1"))
    (stats,) = response.model_stats
    return stats


def batch_sizes(after: pb.ModelStatistics, before: pb.ModelStatistics) -> dict[int, int]:
    """How many executions of each batch size ran between two statistics."""
    earlier = {b.batch_size: b.compute_infer.count for b in before.batch_stats}
    grown = {b.batch_size: b.compute_infer.count - earlier.get(b.batch_size, 0) for b in after.batch_stats}
    return {size: count for size, count in grown.items() if count}


@pytest.fixture(scope="module")
def predictor(repository: Repository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    args = ["--model-repository", str(repository.root), "--port", "0", "--inline-below-us", "0"]
    log = tmp_path_factory.mktemp("batching") / "predictor.log"
    service = ServiceProcess("predictor", args, log_path=log).start()
    try:
        service.wait_healthy()
        yield service
    finally:
        service.stop()


async def test_concurrent_clients_each_get_their_own_rows(
    predictor: ServiceProcess, reference: Reference, sample: np.ndarray
) -> None:
    rng = np.random.default_rng(64)
    scale = sample.std(axis=0)
    # Distinct random rows for every request: 1 or 3 rows each, mixed within every client.
    plans = [
        [
            (rng.normal(size=(1 if (client + turn) % 2 else 3, sample.shape[1])) * scale).astype(np.float32)
            for turn in range(REQUESTS_PER_CLIENT)
        ]
        for client in range(CLIENTS)
    ]
    async with aio.insecure_channel(predictor.address, options=CLIENT_OPTIONS) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        before = await demo_statistics(stub)

        async def client(index: int) -> list[pb.ModelInferResponse]:
            responses = []
            for turn, rows in enumerate(plans[index]):
                request = infer_request(rows, request_id=f"{index}-{turn}")
                responses.append(await stub.ModelInfer(request, timeout=30))
            return responses

        answers = await asyncio.gather(*(client(i) for i in range(CLIENTS)))
        after = await demo_statistics(stub)

    for index, (plan, responses) in enumerate(zip(plans, answers, strict=True)):
        for turn, (rows, response) in enumerate(zip(plan, responses, strict=True)):
            assert response.id == f"{index}-{turn}"
            outputs = decode_outputs(response)
            assert outputs["probabilities"].shape == (len(rows), 2)
            assert_matches_reference(outputs, reference.predict(rows))

    requests = CLIENTS * REQUESTS_PER_CLIENT
    rows_sent = sum(len(rows) for plan in plans for rows in plan)
    executions = after.execution_count - before.execution_count
    assert after.inference_stats.success.count - before.inference_stats.success.count == requests
    assert after.inference_count - before.inference_count == rows_sent
    assert 0 < executions < requests, "no two requests ever shared an execution"
    grown = batch_sizes(after, before)
    assert sum(grown.values()) == executions
    assert max(grown) > 3, f"no batch held more than one request's rows: {grown}"


async def test_one_stream_keeps_a_window_in_flight_so_its_requests_batch(tmp_path) -> None:
    """32 requests of 8 rows on one ModelStreamInfer stream to a model that computes for a while
    (tens of ms a request, far longer than sending the next): they share executions (the stream
    used to run one request at a time, so every batch held one request), the answers come back in
    the order sent with their ids, and a malformed request among them fails alone in
    `error_message` while the stream goes on."""
    root = tmp_path / "models"
    write_slow_model(root, depth=32)
    service = ServiceProcess(
        "predictor",
        ["--model-repository", str(root), "--port", "0", "--inline-below-us", "0"],
        log_path=tmp_path / "predictor.log",
    ).start()
    requests_sent, rows_each = 32, 8
    rows = np.random.default_rng(32).normal(size=(requests_sent, rows_each, 1024)).astype(np.float32)
    try:
        service.wait_healthy()
        async with aio.insecure_channel(service.address, options=CLIENT_OPTIONS) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            def request(index: int, width: int = 1024) -> pb.ModelInferRequest:
                message = pb.ModelInferRequest(model_name="slow", id=f"r-{index}")
                message.inputs.add(name="X", datatype="FP32", shape=[rows_each, width])
                message.raw_input_contents.append(rows[index % requests_sent, :, :width].astype("<f4").tobytes())
                return message

            async def requests():
                for index in range(requests_sent):
                    yield request(index)
                    if index == 10:
                        yield request(99, width=3)  # the wrong shape: fails alone

            responses = [response async for response in stub.ModelStreamInfer(requests(), timeout=120)]
            statistics = await stub.ModelStatistics(pb.ModelStatisticsRequest(name="slow"))
    finally:
        service.stop()
    assert len(responses) == requests_sent + 1
    ids = [r.infer_response.id for r in responses]
    assert ids == [f"r-{i}" for i in range(11)] + ["r-99"] + [f"r-{i}" for i in range(11, 32)]
    bad = responses[11]
    assert "shape [8, 3]" in bad.error_message
    for index, response in enumerate(r for r in responses if r is not bad):
        assert response.error_message == ""
        means = decode_outputs(response.infer_response)["mean"]
        np.testing.assert_allclose(means, rows[index].mean(axis=1), rtol=1e-4, atol=1e-5)
    (stats,) = statistics.model_stats
    assert stats.inference_count == requests_sent * rows_each
    assert stats.execution_count < requests_sent, "no two requests of the stream shared an execution"
    assert max(b.batch_size for b in stats.batch_stats) > rows_each
    # As Triton: every request of a batch is charged the batch's compute, so the request-level
    # figures count requests (what perf_analyzer divides by), and the batch figures executions.
    for phase in ("compute_input", "compute_infer", "compute_output"):
        assert getattr(stats.inference_stats, phase).count == requests_sent, phase
        assert sum(getattr(b, phase).count for b in stats.batch_stats) == stats.execution_count, phase
    charged = sum(b.compute_infer.ns * (b.batch_size // rows_each) for b in stats.batch_stats)
    assert stats.inference_stats.compute_infer.ns == charged  # requests per batch = rows / 8
