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
from tests.integration import CLIENT_OPTIONS, Reference, assert_matches_reference, decode_outputs, infer_request
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
