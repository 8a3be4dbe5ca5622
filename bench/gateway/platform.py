"""The platform the gateway benchmark measures, started the way a user starts it (`fresco.suite.start_platform`):
model manager, a predictor in its fleet, the experiment service and a gateway routed by the manager. On it, the
demo's small classifier (8 named features): v1 serving, v2 in a shadow rollout mirroring 5% of the traffic for
longer than the benchmark runs, one running A/B experiment whose arms are parameters of v1's answers, and the
gateway's value sketches (drift) on, as they are by default."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chassis.server import channel_options
from chassis.settings import DEFAULT_MAX_MESSAGE_BYTES
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.api.experiments.v1 import experiment_service_pb2 as xspb
from fresco.api.experiments.v1 import experiment_service_pb2_grpc as xs_grpc
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as pb_grpc
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.api.models.v1 import rollout_pb2 as ro
from fresco.cli_manager import Manager
from fresco.cli_models import sha256_of, upload_requests
from fresco.story import seconds, signature
from fresco.suite import LocalAuth, Suite, issue_local_tokens, start_platform
from fresco.training import ExportedModel, train_better_classifier, train_classifier
from model_manager.loader import predictor_model_name

MODEL = "bench"
SHADOW_PERCENT = 5.0
_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Platform:
    """The running platform and what the load needs: addresses, the admin's metadata, rows and feature names."""

    suite: Suite
    auth: LocalAuth
    model: str
    served: ExportedModel

    def address(self, module: str) -> str:
        return self.suite.service(module).address

    def pid(self, module: str) -> int:
        process = self.suite.service(module).process
        assert process is not None
        return process.pid

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple(self.auth.admin.metadata())

    @property
    def predictor_model(self) -> str:
        """The name the predictor serves the live version under."""
        return predictor_model_name(self.model, 1)

    @property
    def rows(self) -> np.ndarray:
        return np.asarray(self.served.sample, dtype=np.float64)


def _wait(read, done, timeout_s: float = 120.0, every_s: float = 0.2):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done within {timeout_s}s; last seen:\n{value}")
        time.sleep(every_s)


def _register(m: Manager, model: ExportedModel, version: int) -> None:
    digest, size = sha256_of(model.path)
    upload = pb.UploadModelVersionMetadata(
        model_name=MODEL, format=rpb.MODEL_FORMAT_ONNX, signature=signature(model), expected_sha256=digest,
        expected_size_bytes=size, version=version, reason="gateway benchmark",
    )  # fmt: skip
    m.stub.UploadModelVersion(upload_requests(upload, model.path), timeout=_TIMEOUT_S, metadata=m.metadata)
    gates = rpb.PromotionGates(schema=rpb.SchemaGate())
    promote = pb.PromoteModelVersionRequest(
        model_name=MODEL, version=version, target_stage=rpb.MODEL_STAGE_CANDIDATE, gates=gates, reason="benchmark"
    )
    operation = m.stub.PromoteModelVersion(promote, timeout=_TIMEOUT_S, metadata=m.metadata).operation
    get = pb.GetOperationRequest(operation_id=operation.operation_id)
    done = _wait(lambda: m.stub.GetOperation(get, timeout=_TIMEOUT_S, metadata=m.metadata).operation, lambda o: o.done)
    if done.state != rpb.OPERATION_STATE_SUCCEEDED:
        raise RuntimeError(f"promoting v{version} failed: {done}")


def _deploy(m: Manager, version: int, strategy: ro.RolloutStrategy) -> None:
    deployment = pb.Deployment(model_name=MODEL, version=version, strategy=strategy, replicas=1)
    request = pb.ApplyDeploymentRequest(deployment=deployment, reason=f"benchmark: v{version}")
    m.stub.ApplyDeployment(request, timeout=_TIMEOUT_S, metadata=m.metadata)


def _rollout(m: Manager) -> ro.Rollout:
    request = pb.GetRolloutStatusRequest(model_name=MODEL)
    return m.stub.GetRolloutStatus(request, timeout=_TIMEOUT_S, metadata=m.metadata).rollout


def _experiment() -> xpb.Experiment:
    """A running A/B test of a score threshold: two arms of parameters, half the users each."""
    e = xpb.Experiment(
        key=f"threshold-{uuid.uuid4().hex[:6]}", hypothesis="a lower threshold converts better", model_name=MODEL,
        unit_type="user_id", coverage=1.0, min_units_per_arm=100,
    )  # fmt: skip
    e.arms.add(name="control", weight=0.5, parameters={"threshold": "0.5"})
    e.arms.add(name="treatment", weight=0.5, parameters={"threshold": "0.4"})
    e.metrics.add(
        name="converted", kind=xpb.METRIC_KIND_PROPORTION, event="purchase", role=xpb.METRIC_ROLE_SUCCESS,
        minimum_detectable_effect=0.02,
    )  # fmt: skip
    return e


@contextmanager
def running_platform(root: Path) -> Iterator[Platform]:
    """The platform up with v1 serving, v2 shadowed at 5% and one experiment running; stopped on exit."""
    v1 = train_classifier(root / "models")
    v2 = train_better_classifier(root / "models")
    auth = issue_local_tokens(root / "auth")
    suite = start_platform(root / "platform", auth, experiments=True)
    try:
        options = channel_options(DEFAULT_MAX_MESSAGE_BYTES)
        security = auth.admin
        with security.channel(suite.service("model_manager").address, options) as channel:
            m = Manager(pb_grpc.ModelManagerServiceStub(channel), security.metadata())
            m.stub.CreateModel(
                pb.CreateModelRequest(model=rpb.Model(name=MODEL, owner="bench"), reason="gateway benchmark"),
                timeout=_TIMEOUT_S, metadata=m.metadata,
            )  # fmt: skip
            _register(m, v1, 1)
            _register(m, v2, 2)
            _deploy(m, 1, ro.RolloutStrategy(blue_green=ro.BlueGreenStrategy()))
            _wait(lambda: _rollout(m), lambda r: r.state == ro.ROLLOUT_STATE_SUCCEEDED)
            # Mirrors for an hour, never judged within the benchmark: min_samples out of reach.
            shadow = ro.ShadowStrategy(mirror_percent=SHADOW_PERCENT, duration=seconds(3600), min_samples=10**9)
            _deploy(m, 2, ro.RolloutStrategy(shadow=shadow))
            _wait(lambda: _rollout(m), lambda r: r.state == ro.ROLLOUT_STATE_PROGRESSING and r.version == 2)
        with security.channel(suite.service("experiment_service").address, options) as channel:
            experiments = xs_grpc.ExperimentServiceStub(channel)
            metadata = security.metadata()
            created = experiments.CreateExperiment(
                xspb.CreateExperimentRequest(experiment=_experiment()), metadata=metadata, timeout=_TIMEOUT_S
            ).experiment
            started = experiments.StartExperiment(
                xspb.StartExperimentRequest(key=created.key, expected_version=created.version),
                metadata=metadata, timeout=_TIMEOUT_S,
            ).experiment  # fmt: skip
            if started.status != xpb.EXPERIMENT_STATUS_RUNNING:
                raise RuntimeError(f"experiment not running: {started}")
        yield Platform(suite, auth, MODEL, v1)
    finally:
        suite.stop()
