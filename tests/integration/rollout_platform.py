"""The real platform for the rollout acceptance tests: the model manager, a predictor in its fleet and a gateway
routed by it (fresco.suite.start_platform), the demo's three versions (v1, a better v2, a v3 that fails on live
traffic), and helpers that register, promote, deploy and watch through the manager's RPCs while steady traffic
runs through the gateway."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
from grpc import aio

from chassis.server import channel_options
from chassis.settings import DEFAULT_MAX_MESSAGE_BYTES
from fresco.api.common.v1 import values_pb2
from fresco.api.gateway.v1 import gateway_pb2 as gpb
from fresco.api.gateway.v1 import gateway_pb2_grpc
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as pb_grpc
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.api.models.v1 import rollout_pb2 as ro
from fresco.cli_manager import Manager
from fresco.cli_models import sha256_of, upload_requests
from fresco.client import AsyncGatewayClient, predict_request, to_array
from fresco.demo import row_features
from fresco.story import seconds, signature
from fresco.suite import LocalAuth, Suite
from fresco.training import ExportedModel

RPC_TIMEOUT_S = 30.0
T = TypeVar("T")
SCHEMA_ONLY = rpb.PromotionGates(schema=rpb.SchemaGate())


@dataclass(frozen=True)
class Versions:
    """The demo's three versions, trained once per module."""

    v1: ExportedModel
    v2: ExportedModel
    v3: ExportedModel

    def of(self, version: int) -> ExportedModel:
        return (self.v1, self.v2, self.v3)[version - 1]


@dataclass
class Platform:
    """A running platform and an admin's blocking stub of its manager."""

    suite: Suite
    auth: LocalAuth
    root: Path
    manager: Manager

    @property
    def manager_address(self) -> str:
        return self.suite.services[0].address

    @property
    def gateway_address(self) -> str:
        return self.suite.services[2].address

    @property
    def gateway_metrics_url(self) -> str:
        return self.suite.services[2].metrics_url


@contextmanager
def admin(address: str, auth: LocalAuth) -> Iterator[Manager]:
    """A blocking manager stub carrying the admin token."""
    security = auth.admin
    with security.channel(address, channel_options(DEFAULT_MAX_MESSAGE_BYTES)) as channel:
        yield Manager(pb_grpc.ModelManagerServiceStub(channel), security.metadata())


def create_model(m: Manager, name: str) -> None:
    request = pb.CreateModelRequest(model=rpb.Model(name=name, owner="e2e"), reason="acceptance test")
    m.stub.CreateModel(request, timeout=RPC_TIMEOUT_S, metadata=m.metadata)


def register(m: Manager, name: str, model: ExportedModel, version: int) -> None:
    """Upload `model`'s artifact as `name` v`version`, sha256 checked by the registry."""
    digest, size = sha256_of(model.path)
    metadata = pb.UploadModelVersionMetadata(
        model_name=name,
        format=rpb.MODEL_FORMAT_ONNX,
        signature=signature(model),
        expected_sha256=digest,
        expected_size_bytes=size,
        version=version,
        reason="acceptance test",
    )
    m.stub.UploadModelVersion(upload_requests(metadata, model.path), timeout=RPC_TIMEOUT_S, metadata=m.metadata)


def promote(m: Manager, name: str, version: int) -> None:
    """Pass the schema gate to CANDIDATE, the stage a rollout starts from."""
    request = pb.PromoteModelVersionRequest(
        model_name=name, version=version, target_stage=rpb.MODEL_STAGE_CANDIDATE, gates=SCHEMA_ONLY, reason="e2e"
    )
    operation = m.stub.PromoteModelVersion(request, timeout=RPC_TIMEOUT_S, metadata=m.metadata).operation
    get = pb.GetOperationRequest(operation_id=operation.operation_id)
    done = poll(
        lambda: m.stub.GetOperation(get, timeout=RPC_TIMEOUT_S, metadata=m.metadata).operation, lambda o: o.done
    )
    assert done.state == rpb.OPERATION_STATE_SUCCEEDED, done


def add_versions(m: Manager, name: str, versions: Versions, numbers: tuple[int, ...]) -> None:
    """Create the model and register and promote the given versions of the demo's three."""
    create_model(m, name)
    for number in numbers:
        register(m, name, versions.of(number), number)
        promote(m, name, number)


def apply(m: Manager, name: str, version: int, strategy: ro.RolloutStrategy) -> pb.ApplyDeploymentResponse:
    """Declare `name` served by `version`, rolled out by `strategy`, with automatic rollback; the fallback is the
    previous production version."""
    deployment = pb.Deployment(model_name=name, version=version, strategy=strategy, replicas=1)
    deployment.auto_rollback.enabled = True
    request = pb.ApplyDeploymentRequest(deployment=deployment, reason=f"e2e: serve {name} v{version}")
    return m.stub.ApplyDeployment(request, timeout=RPC_TIMEOUT_S, metadata=m.metadata)


def rollout(m: Manager, name: str) -> ro.Rollout:
    """The model's latest rollout."""
    request = pb.GetRolloutStatusRequest(model_name=name)
    return m.stub.GetRolloutStatus(request, timeout=RPC_TIMEOUT_S, metadata=m.metadata).rollout


def wait_rollout(m: Manager, name: str, done: Callable[[ro.Rollout], bool], timeout_s: float = 90.0) -> ro.Rollout:
    """Poll the model's latest rollout until `done` holds."""
    return poll(lambda: rollout(m, name), done, timeout_s)


def in_state(*states: int) -> Callable[[ro.Rollout], bool]:
    return lambda r: r.state in states


def serve_first(m: Manager, name: str, versions: Versions, numbers: tuple[int, ...] = (1, 2)) -> None:
    """Register the versions and serve v1 blue-green to 100% (the baseline of each test's rollout)."""
    add_versions(m, name, versions, numbers)
    apply(m, name, 1, ro.RolloutStrategy(blue_green=ro.BlueGreenStrategy()))
    wait_rollout(m, name, in_state(ro.ROLLOUT_STATE_SUCCEEDED))


def canary(
    steps: list[float], dwell_s: float, *, min_samples: int = 50, interval_s: float = 1.0, **limits: object
) -> ro.RolloutStrategy:
    """A canary through `steps` (percent) judged every `interval_s` on server errors (and any other `limits`)."""
    analysis = ro.AnalysisThresholds(max_error_rate=0.05, min_samples=min_samples)
    for key, value in limits.items():
        if key == "inconclusive_limit_s":
            analysis.inconclusive_limit.CopyFrom(seconds(float(value)))  # type: ignore[arg-type]
        else:
            setattr(analysis, key, value)
    return ro.RolloutStrategy(
        canary=ro.CanaryStrategy(
            steps=[ro.CanaryStep(traffic_percent=p, duration=seconds(dwell_s)) for p in steps],
            analysis=analysis,
            analysis_interval=seconds(interval_s),
        )
    )


def poll(read: Callable[[], T], done: Callable[[T], bool], timeout_s: float = 90.0, every_s: float = 0.1) -> T:
    """Call `read` until `done` holds on its value; fail with the last value past the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not done within {timeout_s}s; last seen:\n{value}")
        time.sleep(every_s)


def event_time(event: ro.RolloutEvent) -> float:
    """An event's time on the manager's clock, in seconds."""
    return event.time.seconds + event.time.nanos / 1e9


@dataclass(frozen=True)
class Answer:
    """One answered Predict call."""

    at: float
    row: int
    version: str
    fallback: bool
    fallback_reason: str
    outputs: dict[str, np.ndarray]


@dataclass
class Traffic:
    """Steady Predict calls through the gateway from a background thread, each with a unit id; every answer and
    every failure is kept. `bad_every` > 0 makes every n-th request a caller's mistake (a string where the model
    takes a number), kept apart in `refused`."""

    address: str
    model: str
    feature_names: list[str]
    rows: np.ndarray
    concurrency: int = 4
    units: int = 1000
    bad_every: int = 0
    answers: list[Answer] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Traffic:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="e2e-traffic", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def count(self) -> int:
        with self._lock:
            return len(self.answers)

    def since(self, at: float) -> list[Answer]:
        """Answers to calls sent at or after `at` (time.time())."""
        with self._lock:
            return [a for a in self.answers if a.at >= at]

    def wait_answers(self, n: int, timeout_s: float = 60.0) -> None:
        """Until `n` more answers than now came back."""
        start = self.count()
        poll(self.count, lambda c: c >= start + n, timeout_s)

    async def _run(self) -> None:
        async with AsyncGatewayClient(self.address, timeout_s=10.0) as client:
            await asyncio.gather(*(self._worker(client, w) for w in range(self.concurrency)))

    def _request(self, index: int) -> tuple[gpb.PredictRequest, bool]:
        row = index % len(self.rows)
        request = predict_request(self.model, row_features(self.feature_names, self.rows[row]), request_id=str(index))
        request.unit_id = f"unit-{index % self.units}"
        bad = self.bad_every > 0 and index % self.bad_every == 0
        if bad:
            request.features[self.feature_names[0]].CopyFrom(values_pb2.Value(string_value="not a number"))
        return request, bad

    async def _worker(self, client: AsyncGatewayClient, worker: int) -> None:
        index = worker
        while not self._stop.is_set():
            request, bad = self._request(index)
            row, sent = index % len(self.rows), time.time()
            index += self.concurrency
            try:
                response = await client.send(request)
            except aio.AioRpcError as err:
                with self._lock:
                    if bad and err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                        self.refused[err.details() or ""] += 1
                    else:
                        self.failures[f"{err.code().name}: {err.details()}"] += 1
                await asyncio.sleep(0.02)
                continue
            outputs = {name: to_array(tensor) for name, tensor in response.outputs.items()}
            answer = Answer(sent, row, response.model_version, response.fallback, response.fallback_reason, outputs)
            with self._lock:
                if bad:
                    self.failures[f"a bad request was answered by v{response.model_version}"] += 1
                else:
                    self.answers.append(answer)


def predict_some(address: str, model: str, feature_names: list[str], rows: np.ndarray, n: int) -> Counter[str]:
    """`n` Predict calls through the gateway, one after another, each with its own unit id; answers by version."""
    served: Counter[str] = Counter()
    with grpc.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        for index in range(n):
            request = predict_request(model, row_features(feature_names, rows[index % len(rows)]))
            request.unit_id = f"unit-{index}"
            served[stub.Predict(request, timeout=RPC_TIMEOUT_S).model_version] += 1
    return served
