"""Fleet state is soft: a predictor started before the manager serves anyway and joins once the manager is up; a
restarted manager knows no predictor until each hears `known=false` and registers again, while inference goes on."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from fresco.api.inference import grpc_service_pb2 as ipb
from fresco.api.inference import grpc_service_pb2_grpc as ipb_grpc
from fresco.api.models.v1 import fleet_pb2 as fpb
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as pb_grpc
from fresco.servers._process import free_port
from fresco.suite import ServiceProcess
from fresco.training import train_classifier
from tests.integration import CLIENT_OPTIONS, infer_request

pytestmark = pytest.mark.integration


def start_manager(data_dir: Path, port: int) -> ServiceProcess:
    args = [
        "--data-dir", str(data_dir), "--port", str(port), "--metrics-port", "-1",
        "--heartbeat-interval-s", "0.3", "--predictor-lease-s", "3", "--log-format", "text",
    ]  # fmt: skip
    process = ServiceProcess("model_manager", args).start()
    process.wait_healthy(60)
    return process


def predictors(address: str) -> dict[str, fpb.PredictorInfo]:
    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.ModelManagerServiceStub(channel).ListPredictors(pb.ListPredictorsRequest(), timeout=10)
    return {p.predictor_id: p for p in reply.predictors}


def wait_for(check, timeout_s: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout_s}s: {what}"
        time.sleep(0.1)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    train_classifier(root, "demo", 1)
    return root


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def predictor(repository: Path, port: int) -> Iterator[ServiceProcess]:
    """A predictor serving `demo`, told to join a manager that is not running yet."""
    args = [
        "--model-repository", str(repository), "--port", "0", "--metrics-port", "-1",
        "--model-control-mode", "explicit", "--load-model", "demo",
        "--model-manager-address", f"127.0.0.1:{port}", "--predictor-id", "solo", "--log-format", "text",
    ]  # fmt: skip
    process = ServiceProcess("predictor", args).start()
    try:
        process.wait_healthy(60)  # healthy without the manager: registration never holds serving up
        yield process
    finally:
        assert process.stop() == 0


def infer_ok(address: str) -> bool:
    rows = [[0.0] * 8]
    with grpc.insecure_channel(address, options=CLIENT_OPTIONS) as channel:
        reply = ipb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(rows), timeout=10)
    return reply.model_name == "demo"


def test_predictors_join_late_and_register_again_after_a_manager_restart(
    predictor: ServiceProcess, port: int, tmp_path: Path
) -> None:
    assert infer_ok(predictor.address)
    manager = start_manager(tmp_path / "manager", port)
    try:
        joined = wait_for(lambda: predictors(manager.address).get("solo"), 30, "the predictor registered")
        assert (joined.address, joined.state) == (predictor.address, fpb.PREDICTOR_STATE_READY)
        boot = joined.boot_id

        def reports_demo() -> bool:
            found = predictors(manager.address).get("solo")
            return found is not None and [m.predictor_model_name for m in found.loaded_models] == ["demo"]

        wait_for(reports_demo, 30, "heartbeats report the loaded model")
        assert manager.stop() == 0
        # The manager is down: the predictor keeps serving while it retries.
        assert infer_ok(predictor.address)
        manager = start_manager(tmp_path / "manager", port)
        again = wait_for(lambda: predictors(manager.address).get("solo"), 30, "registered with the new manager")
        assert (again.boot_id, again.state) == (boot, fpb.PREDICTOR_STATE_READY)
        wait_for(reports_demo, 30, "the new manager knows the loaded model")
        output = predictor.output()
        assert "registering again" in output
        assert output.count("registered with the model manager as solo") >= 2
    finally:
        manager.stop()
    with grpc.insecure_channel(predictor.address) as channel:
        ready = ipb_grpc.GRPCInferenceServiceStub(channel).ServerReady(ipb.ServerReadyRequest(), timeout=10)
    assert ready.ready
