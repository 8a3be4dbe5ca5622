"""`--workers 2` over HTTP: the workers share the HTTP port as they share the gRPC one, each answers
exactly, statistics cover both, and repository calls made over HTTP reach every worker. And SIGTERM
drains HTTP calls in flight as it drains gRPC ones.

SO_REUSEPORT spreads connections, not calls: each request here opens its own connection."""

from __future__ import annotations

import json
import shutil
import signal
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fresco.api.inference import grpc_service_pb2 as pb
from fresco.api.inference import grpc_service_pb2_grpc as pb_grpc
from fresco.suite import ServiceProcess
from tests.integration import CLIENT_OPTIONS, Reference, decode_outputs, write_slow_model
from tests.integration.listeners import describe_listeners
from tests.integration.rest import Http, exact_json, infer_body
from tests.integration.test_workers import (
    CONNECTIONS,
    EXPLICIT,
    in_flight,
    metric_samples,
    pids_of,
    slow_request,
    workers_args,
)

pytestmark = pytest.mark.integration

INFER = "POST /v2/models/{name}/infer"
GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def supervisor(repository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, Path]]:
    root = tmp_path_factory.mktemp("http-workers") / "models"
    shutil.copytree(repository.root / "demo", root / "demo")
    service = ServiceProcess("predictor", workers_args(root, *EXPLICIT), log_path=root.parent / "predictor.log")
    try:
        service.start()
        service.wait_healthy()  # one worker is serving; the other may still be loading demo
        deadline = time.monotonic() + 60
        while (ready := statuses(service.http_url, "/v2/models/demo/ready")) != [200] * CONNECTIONS:
            assert time.monotonic() < deadline, (
                f"demo not ready on every worker: {ready}\n{describe_listeners(port_of(service.http_url))}\n"
                f"{service.output()}"
            )
            time.sleep(0.1)
        yield service, root
    finally:
        service.stop()


def each_connection(url: str, method: str, path: str, document: object = None) -> list[tuple[int, object]]:
    """The same call on CONNECTIONS new connections (so on every worker, but with odds of 2**-15)."""
    answers = []
    for _ in range(CONNECTIONS):
        client = Http(url)
        try:
            answers.append(client.json(method, path, document))
        except OSError as err:  # refused, reset or timed out: say who holds the port, and what they do
            raise AssertionError(f"{method} {path} on {url}: {err!r}\n{describe_listeners(port_of(url))}") from err
        finally:
            client.close()
    return answers


def port_of(url: str) -> int:
    port = urllib.parse.urlsplit(url).port
    assert port is not None, url
    return port


def statuses(url: str, path: str) -> list[int]:
    """GET `path` on CONNECTIONS new connections: each status."""
    return [status for status, _ in each_connection(url, "GET", path)]


def inferences(url: str) -> int:
    client = Http(url)
    try:
        status, answer = client.json("GET", "/v2/models/demo/stats")
    finally:
        client.close()
    assert status == 200, answer
    return int(answer["model_stats"][0]["inference_count"])


def test_every_worker_answers_exactly_and_statistics_cover_them(
    supervisor, sample: np.ndarray, reference: Reference
) -> None:
    service, _ = supervisor
    assert service.http_url.startswith("http://127.0.0.1:"), service.lines
    assert service.http_url != f"http://{service.address}"
    rows = sample[:3]
    expected = reference.predict(rows)
    before = inferences(service.http_url)
    for status, answer in each_connection(service.http_url, "POST", "/v2/models/demo/infer", infer_body(rows)):
        assert status == 200, answer
        assert isinstance(answer, dict)
        outputs = {output["name"]: output for output in answer["outputs"]}
        for name in ("label", "probabilities"):
            exact_json(outputs[name], expected[name])
    # Statistics over HTTP gather every worker's, as ModelStatistics over gRPC does.
    assert inferences(service.http_url) - before == CONNECTIONS * len(rows)
    samples = metric_samples(service.metrics_url)
    loaded = pids_of(samples, "fresco_model_loaded", model="demo", version="1")
    assert len(loaded) == 2, loaded
    served = pids_of(samples, "fresco_rpc_in_flight", method=INFER)
    assert served == loaded, f"HTTP inference handled by workers {served} of {loaded}"


def test_load_and_unload_over_http_reach_every_worker(
    supervisor, repository, sample: np.ndarray, reference: Reference
) -> None:
    service, root = supervisor
    url = service.http_url
    shutil.copytree(repository.root / "demo", root / "fresh")
    assert set(statuses(url, "/v2/models/fresh/ready")) == {503}
    client = Http(url)
    try:
        status, answer = client.json("POST", "/v2/repository/models/fresh/load", {})
        assert status == 200, answer
    finally:
        client.close()
    assert set(statuses(url, "/v2/models/fresh/ready")) == {200}
    rows = sample[5:7]
    expected = reference.predict(rows)
    for status, answer in each_connection(url, "POST", "/v2/models/fresh/infer", infer_body(rows)):
        assert status == 200, answer
        assert isinstance(answer, dict)
        exact_json(next(o for o in answer["outputs"] if o["name"] == "probabilities"), expected["probabilities"])
    client = Http(url)
    try:
        assert client.json("POST", "/v2/repository/models/fresh/unload")[0] == 200
    finally:
        client.close()
    assert set(statuses(url, "/v2/models/fresh/ready")) == {503}
    answers = each_connection(url, "POST", "/v2/models/fresh/infer", infer_body(rows))
    assert {status for status, _ in answers} == {404}


def test_sigterm_lets_http_calls_in_flight_finish(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_slow_model(root, depth=32)  # about a quarter of a second per call on one core
    service = ServiceProcess("predictor", ["--model-repository", str(root), "--port", "0"], log_path=tmp_path / "p.log")
    rows = np.random.default_rng(9).normal(size=(256, 1024)).astype(np.float32)
    header = json.dumps(
        {
            "inputs": [{"name": "X", "datatype": "FP32", "shape": [256, 1024],
                        "parameters": {"binary_data_size": rows.nbytes}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()  # fmt: skip
    clients: list[Http] = []
    try:
        service.start()
        service.wait_healthy()
        # More calls than the predictor computes at once (two inference threads): they stay in flight
        # well past the moment the last one arrives, so a scrape sees them whatever the load.
        clients = [Http(service.http_url) for _ in range(3)]
        with ThreadPoolExecutor(len(clients)) as pool:
            answers = [
                pool.submit(
                    client.call,
                    "POST",
                    "/v2/models/slow/infer",
                    header + rows.tobytes(),
                    {"Inference-Header-Content-Length": str(len(header))},
                )
                for client in clients
            ]
            deadline = time.monotonic() + 20
            while True:  # every call has reached the predictor, and some are still being handled there
                answered = sum(answer.done() for answer in answers)  # before the scrape: none is in flight in it
                handled = in_flight(service.metrics_url, INFER)
                if handled and handled + answered == len(answers):
                    break
                assert answered < len(answers), f"every call was answered before SIGTERM: {service.output()}"
                assert time.monotonic() < deadline, "the calls never all reached the predictor"
                time.sleep(0.01)
            assert service.process is not None
            service.process.send_signal(signal.SIGTERM)
            for answer in answers:
                status, headers, body = answer.result(timeout=60)
                assert status == 200, body[:300]
                length = int(headers["Inference-Header-Content-Length"])
                np.testing.assert_allclose(np.frombuffer(body[length:], "<f4"), rows.mean(axis=1), rtol=1e-4, atol=1e-5)
        assert service.process.wait(30) == 0, service.output()
    finally:
        for client in clients:
            client.close()
        service.stop()


def test_http_and_grpc_requests_batch_together(tmp_path: Path) -> None:
    """One batcher behind both transports: small requests queued over HTTP and over gRPC while the
    model is busy run in one execution; one whose `timeout` passes in the queue is dropped (504)."""
    root = tmp_path / "models"
    write_slow_model(root, depth=32)
    service = ServiceProcess("predictor", ["--model-repository", str(root), "--port", "0"], log_path=tmp_path / "p.log")
    rng = np.random.default_rng(3)
    # More than max_batch_size (64): it runs alone, for seconds (32 MatMuls of 4096x1024 by 1024x1024),
    # a wide margin over the milliseconds the 7 small requests take to queue behind it even on a loaded
    # machine (at 512 rows, about 0.5 s, they sometimes arrived after it had finished).
    busy = rng.normal(size=(4096, 1024)).astype(np.float32)
    small = [rng.normal(size=(4, 1024)).astype(np.float32) for _ in range(6)]
    try:
        service.start()
        service.wait_healthy()
        with grpc.insecure_channel(service.address, options=CLIENT_OPTIONS) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with ThreadPoolExecutor(len(small) + 1) as pool:
                first = pool.submit(stub.ModelInfer, slow_request(busy, "busy"), timeout=60)
                deadline = time.monotonic() + 20
                while not in_flight(service.metrics_url, GRPC_INFER):  # the model is busy with it
                    assert time.monotonic() < deadline, "the busy request was never in flight"
                    time.sleep(0.005)
                by_http = [pool.submit(http_infer, service.http_url, rows) for rows in small[:3]]
                # Triton's `timeout` parameter (µs) is the request's deadline: 1 ms cannot wait out the busy model.
                late = pool.submit(
                    http_call, service.http_url, infer_body(small[0], parameters={"timeout": 1000}), "slow"
                )
                by_grpc = [pool.submit(stub.ModelInfer, slow_request(rows, "small"), timeout=60) for rows in small[3:]]
                first.result()
                status, late_answer = late.result()
                assert (status, "deadline passed" in str(late_answer.get("error"))) == (504, True), late_answer
                answers = [future.result() for future in by_http]
                answers += [decode_outputs(future.result())["mean"] for future in by_grpc]
            for rows, answer in zip(small, answers, strict=True):
                np.testing.assert_allclose(answer, rows.mean(axis=1), rtol=1e-4, atol=1e-5)
            stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="slow"), timeout=10).model_stats[0]
    finally:
        service.stop()
    # 12 rows came over each transport: a batch of more holds requests of both.
    assert max(batch.batch_size for batch in stats.batch_stats if batch.batch_size <= 64) > 12, stats.batch_stats


def http_call(url: str, document: object, model: str) -> tuple[int, Any]:
    """One inference call on a connection of its own: status and answer."""
    client = Http(url)
    try:
        return client.json("POST", f"/v2/models/{model}/infer", document)
    finally:
        client.close()


def http_infer(url: str, rows: np.ndarray) -> np.ndarray:
    status, answer = http_call(url, infer_body(rows), "slow")
    assert status == 200, answer
    return np.array(answer["outputs"][0]["data"], dtype=np.float32)
