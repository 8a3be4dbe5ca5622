"""A service's life: NOT_SERVING until its models are loaded, SERVING after; draining in-flight calls
on SIGTERM and exiting 0; its Prometheus endpoint counting what it served."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from fresco.api.gateway.v1 import gateway_pb2
from fresco.api.inference import grpc_service_pb2 as pb
from fresco.api.inference import grpc_service_pb2_grpc as pb_grpc
from fresco.suite import ServiceProcess
from tests.integration import (
    CLIENT_OPTIONS,
    decode_outputs,
    features_of,
    infer_request,
    write_slow_model,
)

pytestmark = pytest.mark.integration

INFER = "/inference.GRPCInferenceService/ModelInfer"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def predictor_process(repository: Path, log: Path, **env: str) -> ServiceProcess:
    return ServiceProcess("predictor", ["--model-repository", str(repository), "--port", "0"], env=env, log_path=log)


def model_ready(stub: pb_grpc.GRPCInferenceServiceStub, name: str) -> bool | str:
    """ModelReady's answer, or the status code it failed with."""
    try:
        return stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=5).ready
    except grpc.RpcError as err:
        return str(err.code().name)


def test_not_serving_until_the_model_is_loaded(repository, tmp_path: Path) -> None:
    """The model file is a named pipe, so the predictor's read of it blocks until the test writes
    the model into it: until then the server is up but NOT_SERVING and the model not ready."""
    root = tmp_path / "models"
    (root / "demo" / "1").mkdir(parents=True)
    shutil.copy(repository.root / "demo" / "config.yaml", root / "demo" / "config.yaml")
    fifo = root / "demo" / "1" / "model.onnx"
    os.mkfifo(fifo)
    model_bytes = repository.demo.path.read_bytes()
    written = threading.Event()

    def feed() -> None:
        with fifo.open("wb") as pipe:
            pipe.write(model_bytes)
        written.set()

    service = predictor_process(root, tmp_path / "predictor.log").start()
    try:
        with grpc.insecure_channel(service.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for name in ("", "inference.GRPCInferenceService"):
                reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert reply.status == NOT_SERVING, name
            assert model_ready(stub, "demo") in (False, "UNAVAILABLE")
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live is True
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready is False
            index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5)
            assert [(m.name, m.state) for m in index.models] == [("demo", "LOADING")]
            assert service.process is not None
            assert service.process.poll() is None

            feeder = threading.Thread(target=feed, name="fifo-feeder", daemon=True)
            feeder.start()
            service.wait_healthy(timeout_s=30)
            feeder.join(5)
            assert written.is_set()
            for name in ("", "inference.GRPCInferenceService"):
                assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == SERVING
            assert model_ready(stub, "demo") is True
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready is True
            response = stub.ModelInfer(infer_request(repository.demo.sample[:2]), timeout=10)
            assert [t.name for t in response.outputs] == ["label", "probabilities"]
        assert service.stop() == 0, service.output()
    finally:
        if not written.is_set():  # unblock the predictor's read so that it can stop
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        service.stop()


def in_flight(metrics_url: str, method: str) -> float:
    """The predictor's in-flight gauge for one method, scraped now."""
    with urllib.request.urlopen(metrics_url, timeout=5) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "fresco_rpc_in_flight" and sample.labels.get("method") == method:
                return sample.value
    return 0.0


def slow_request(rows: np.ndarray, request_id: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="slow", id=request_id)
    request.inputs.add(name="X", datatype="FP32", shape=rows.shape)
    request.raw_input_contents.append(rows.astype("<f4").tobytes())
    return request


async def test_sigterm_drains_in_flight_requests(tmp_path: Path) -> None:
    """Calls running when SIGTERM arrives finish OK, an open stream keeps answering, then the
    process exits 0."""
    root = tmp_path / "models"
    write_slow_model(root, depth=64)  # about half a second per call on one core
    service = predictor_process(root, tmp_path / "predictor.log", FRESCO_PREDICTOR_INFERENCE_THREADS="3").start()
    service.wait_healthy()
    rows = np.random.default_rng(3).normal(size=(256, 1024)).astype(np.float32)
    expected = rows.mean(axis=1)  # the model averages each row
    try:
        async with aio.insecure_channel(service.address, options=CLIENT_OPTIONS) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            stream = stub.ModelStreamInfer()
            await stream.write(slow_request(rows[:2], "stream-before"))
            before = await stream.read()
            assert isinstance(before, pb.ModelStreamInferResponse)
            assert before.error_message == ""

            calls = [
                asyncio.ensure_future(stub.ModelInfer(slow_request(rows, f"call-{i}"), timeout=60)) for i in range(3)
            ]
            deadline = time.monotonic() + 20
            while await asyncio.to_thread(in_flight, service.metrics_url, INFER) < len(calls):
                assert not any(call.done() for call in calls), "a call finished before all were in flight"
                assert time.monotonic() < deadline, "the calls never were in flight together"
                await asyncio.sleep(0.01)
            assert service.process is not None
            service.process.send_signal(signal.SIGTERM)

            while True:  # the server is stopping once its health check stops saying SERVING
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                except aio.AioRpcError:
                    break
                if reply.status != SERVING:
                    break
                assert time.monotonic() < deadline, "the predictor still says SERVING long after SIGTERM"
                await asyncio.sleep(0.01)
            await stream.write(slow_request(rows[2:4], "stream-after"))
            after = await stream.read()
            assert isinstance(after, pb.ModelStreamInferResponse)
            await stream.done_writing()
            assert await stream.read() is aio.EOF
            assert await stream.code() == grpc.StatusCode.OK

            responses = await asyncio.gather(*calls)
        for i, response in enumerate(responses):
            assert response.id == f"call-{i}"
            np.testing.assert_allclose(decode_outputs(response)["mean"], expected, rtol=1e-4, atol=1e-5)
        assert after.error_message == ""
        assert after.infer_response.id == "stream-after"
        np.testing.assert_allclose(decode_outputs(after.infer_response)["mean"], expected[2:4], rtol=1e-4, atol=1e-5)

        exit_code = await asyncio.to_thread(service.process.wait, 30)
        assert exit_code == 0, service.output()
        assert "stopping: draining in-flight calls" in service.output()
    finally:
        service.stop()


def scrape(url: str) -> dict[tuple[str, ...], float]:
    """Every sample of a /metrics page by (name, sorted label values...), checking its content type."""
    with urllib.request.urlopen(url, timeout=5) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, *(f"{k}={v}" for k, v in sorted(sample.labels.items())))] = sample.value
    return samples


def requests_total(samples: dict[tuple[str, ...], float], service: str, method: str, code: str) -> float:
    return samples.get(("fresco_rpc_requests_total", f"code={code}", f"method={method}", f"service={service}"), 0.0)


async def test_metrics_count_rpcs_by_method_and_code(
    predictor: ServiceProcess, gateway: ServiceProcess, predictor_aio, gateway_aio, sample: np.ndarray
) -> None:
    assert predictor.metrics_url.startswith("http://127.0.0.1:")
    assert predictor.metrics_url.endswith("/metrics")
    before = await asyncio.to_thread(scrape, predictor.metrics_url)
    gateway_before = await asyncio.to_thread(scrape, gateway.metrics_url)
    for start in range(3):
        await predictor_aio.ModelInfer(infer_request(sample[start : start + 2]))
    with pytest.raises(aio.AioRpcError):
        await predictor_aio.ModelInfer(infer_request(sample[:2], model="no-such-model"))
    await gateway_aio.Predict(gateway_pb2.PredictRequest(model="demo", features=features_of(sample[0])))
    after = await asyncio.to_thread(scrape, predictor.metrics_url)
    gateway_after = await asyncio.to_thread(scrape, gateway.metrics_url)

    def grew(a: dict[tuple[str, ...], float], b: dict[tuple[str, ...], float], *key: str) -> float:
        return requests_total(b, *key) - requests_total(a, *key)

    assert grew(before, after, "predictor", INFER, "OK") == 4  # three direct calls, one from the gateway
    assert grew(before, after, "predictor", INFER, "NOT_FOUND") == 1
    latency_count = ("fresco_rpc_latency_seconds_count", f"method={INFER}", "service=predictor")
    assert after[latency_count] - before.get(latency_count, 0.0) == 5
    assert grew(gateway_before, gateway_after, "gateway", "/fresco.gateway.v1.GatewayService/Predict", "OK") == 1
    assert not [key for key in after if any("grpc.health" in part for part in key)], "health checks are not counted"


def test_gateway_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """A gateway with nothing in flight exits 0 on SIGTERM, and stopping it leaves no pipe open."""
    service = ServiceProcess("gateway", ["--predictor", "127.0.0.1:9", "--port", "0"], log_path=tmp_path / "gw.log")
    service.start()
    service.wait_healthy()
    assert service.stop() == 0, service.output()
    assert "gateway stopping" in service.output()
    assert service.process is not None
    assert service.process.stdout is not None
    assert service.process.stdout.closed
