"""Real processes for the route tests: one predictor serving versions 1 and 2 of model "m" (two
different classifiers), gateways started against a route manager, and endpoints that are down or
never answer."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml
from grpc import aio
from prometheus_client.parser import text_string_to_metric_families

from fresco.api.gateway.v1 import gateway_pb2 as gpb
from fresco.api.gateway.v1 import gateway_pb2_grpc as gpb_grpc
from fresco.suite import ServiceProcess
from fresco.training import train_classifier
from model_manager.routes import Endpoint, MetricsConfig, ModelRoute, RouteTable, Shadow, StaticValue, VersionRoute
from tests.integration import Reference, features_of

MODEL = "fraud"  # the name callers use; the predictor serves it as "m"
PREDICTOR_MODEL = "m"
FAST_WINDOWS = MetricsConfig(window_seconds=0.5)
INFERENCE_SERVICE = "inference.GRPCInferenceService"


@dataclass
class Predictors:
    """The predictor process and the reference answers of each version."""

    process: ServiceProcess
    references: dict[str, Reference]
    root: Path

    def start_another(self) -> ServiceProcess:
        """One more predictor on the same repository (stop it after)."""
        process = ServiceProcess("predictor", _predictor_args(self.root))
        process.start()
        try:
            process.wait_healthy()
        except BaseException:
            process.stop()
            raise
        return process

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint.parse(self.process.address)

    def rows(self) -> np.ndarray:
        return self.references["1"].model.sample


def start_predictors(root: Path) -> Iterator[Predictors]:
    """Versions 1 and 2 of "m", both served by one predictor."""
    references = {str(v): Reference(train_classifier(root, PREDICTOR_MODEL, v, seed=7 + v)) for v in (1, 2)}
    config_path = root / PREDICTOR_MODEL / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config_path.write_text(yaml.safe_dump({**config, "version_policy": {"all": True}}, sort_keys=False))
    process = ServiceProcess("predictor", _predictor_args(root))
    process.start()
    try:
        process.wait_healthy()
        yield Predictors(process, references, root)
    finally:
        process.stop()


def _predictor_args(root: Path) -> list[str]:
    return ["--model-repository", str(root), "--port", "0", "--metrics-port", "-1"]


def version(number: str, weight: int, *endpoints: Endpoint) -> VersionRoute:
    return VersionRoute(number, weight, endpoints, PREDICTOR_MODEL)


def table(
    revision: int,
    *versions: VersionRoute,
    shadow: Shadow | None = None,
    fallback: str = "",
    seed: str = "seed-1",
    static_answer: tuple[tuple[str, StaticValue], ...] = (),
) -> RouteTable:
    route = ModelRoute(
        MODEL,
        versions,
        seed,
        shadow=shadow,
        fallback=fallback,
        score_output="probabilities",
        score_bounds=(0.5,),
        static_answer=static_answer,
    )
    return RouteTable(revision, (route,), FAST_WINDOWS)


async def start_gateway(manager_address: str, state_dir: Path, *args: str) -> ServiceProcess:
    """A gateway process routed by the manager at `manager_address` (which may be down), healthy."""
    process = ServiceProcess(
        "gateway",
        [
            "--port", "0", "--metrics-port", "0", "--model-manager-address", manager_address,
            "--state-dir", str(state_dir), "--gateway-id", "gw-test", "--route-backoff-max-s", "0.5", *args,
        ],
    )  # fmt: skip
    # Blocking waits run off the loop: the manager serving the gateway runs on it.
    await asyncio.to_thread(process.start)
    try:
        await asyncio.to_thread(process.wait_healthy)
    except BaseException:
        await asyncio.to_thread(process.stop)
        raise
    return process


def metric(process: ServiceProcess, name: str, labels: dict[str, str] | None = None) -> float | None:
    """One sample of the process's /metrics, None when absent."""
    with urllib.request.urlopen(process.metrics_url, timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return float(sample.value)
    return None


def request(row: np.ndarray, unit_id: str = "", pinned: str = "") -> gpb.PredictRequest:
    return gpb.PredictRequest(model=MODEL, features=features_of(row), unit_id=unit_id, version=pinned)


def probabilities(response: gpb.PredictResponse) -> np.ndarray:
    return np.array(response.outputs["probabilities"].double_values)


def closed_port() -> Endpoint:
    """An endpoint nothing listens on: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return Endpoint("127.0.0.1", port)


class Running:
    """A gateway process and a stub to it."""

    def __init__(self, process: ServiceProcess) -> None:
        self.process = process
        self.channel = aio.insecure_channel(process.address)
        self.stub = gpb_grpc.GatewayServiceStub(self.channel)

    async def predict(self, row: np.ndarray, unit_id: str = "", pinned: str = "") -> gpb.PredictResponse:
        response: gpb.PredictResponse = await self.stub.Predict(request(row, unit_id, pinned), timeout=30)
        return response

    async def close(self) -> None:
        await self.channel.close()
        await asyncio.to_thread(self.process.stop)


class StalledPredictor:
    """A real gRPC server on the inference service's methods that never answers until released."""

    def __init__(self) -> None:
        self.server = aio.server()
        self.release = asyncio.Event()
        self.calls = 0

        async def stall(request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
            self.calls += 1
            await self.release.wait()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "test: stalled predictor released")
            return b""

        handler = grpc.unary_unary_rpc_method_handler(stall)  # bytes in, bytes out
        methods = {name: handler for name in ("ModelMetadata", "ModelInfer", "ModelReady")}
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(INFERENCE_SERVICE, methods)])
        self.endpoint = Endpoint("127.0.0.1", self.server.add_insecure_port("127.0.0.1:0"))

    async def start(self) -> StalledPredictor:
        await self.server.start()
        return self

    async def stop(self) -> None:
        self.release.set()
        await self.server.stop(0)


async def wait_until(condition: object, what: str, timeout_s: float = 60.0) -> None:
    """Poll `condition()` until true; a generous bound for a loaded machine."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():  # type: ignore[operator]
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
