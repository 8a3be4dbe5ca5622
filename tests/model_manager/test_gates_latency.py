"""All three gates on one version, in process, against a real predictor process (the latency gate's ModelInfer)
and a real feature service process (the schema gate's feature refs); the fleet is a tiny object pointing at the
predictor, standing in for model_manager.fleet.Fleet, which places versions in the product."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from grpc import aio

from chassis.errors import FailedPrecondition
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.suite import ServiceProcess
from model_manager.artifacts import ArtifactStore
from model_manager.gate_schema import FeatureCatalog
from model_manager.gates import GateRunner
from model_manager.lifecycle import Stage
from model_manager.operations import OperationStore
from model_manager.promotions import PromoteRequest, Promotions
from model_manager.records import ModelSpec, VersionSpec
from model_manager.registry import Registry
from model_manager.routes import Endpoint
from model_manager.tables import sqlite_url
from model_manager.uploads import VersionUploads
from tests.model_manager.gate_support import DEFINITIONS, Models, backtest_gate, signature, train_models

pytestmark = pytest.mark.integration

MODEL = "churn"


@dataclass
class PredictorAt:
    """The one Fleet capability the latency gate needs, answered with a predictor this test started."""

    endpoint: Endpoint
    loads: list[tuple[str, int, int]] = field(default_factory=list)

    async def ensure_loaded(self, model: str, version: int, *, replicas: int = 1) -> tuple[Endpoint, ...]:
        self.loads.append((model, version, replicas))
        return (self.endpoint,)

    def predictor_model_name(self, model: str, version: int) -> str:
        return model

    async def release(self, model: str, version: int) -> None:
        pass


class NoRoom:
    """A fleet that cannot place the version."""

    async def ensure_loaded(self, model: str, version: int, *, replicas: int = 1) -> tuple[Endpoint, ...]:
        raise FailedPrecondition("no predictor has room for 64 MiB")

    def predictor_model_name(self, model: str, version: int) -> str:
        return model

    async def release(self, model: str, version: int) -> None:
        pass


def endpoint(process: ServiceProcess) -> Endpoint:
    host, port = process.address.rsplit(":", 1)
    host = host.strip("[]")
    return Endpoint("127.0.0.1" if host in ("0.0.0.0", "", "::", "localhost") else host, int(port))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("latency")


@pytest.fixture(scope="module")
def models(root: Path) -> Models:
    return train_models(root)


@pytest.fixture(scope="module")
def predictor(root: Path, models: Models) -> Iterator[ServiceProcess]:
    """A predictor whose repository holds the good model as version 1 of MODEL."""
    (root / "repository" / MODEL / "1").mkdir(parents=True)
    (root / "repository" / MODEL / "1" / "model.onnx").write_bytes(models.good)
    args = ["--model-repository", str(root / "repository"), "--port", "0", "--metrics-port", "-1"]
    process = ServiceProcess("predictor", args).start()
    try:
        process.wait_healthy(120)
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def features(root: Path) -> Iterator[ServiceProcess]:
    (root / "definitions.yaml").write_text(DEFINITIONS)
    args = ["--definitions", str(root / "definitions.yaml"), "--sqlite-path", str(root / "f.db"), "--port", "0"]
    process = ServiceProcess("feature_service", [*args, "--metrics-port", "-1"]).start()
    try:
        process.wait_healthy(60)
        yield process
    finally:
        process.stop()


@dataclass
class World:
    registry: Registry
    store: ArtifactStore
    catalog: FeatureCatalog


@pytest.fixture
async def world(tmp_path: Path, features: ServiceProcess, models: Models) -> AsyncIterator[World]:
    """A registry holding the good model as version 1 of MODEL, its artifact store, and the feature catalog."""
    registry = Registry.open(sqlite_url(tmp_path / "registry.db"))
    store = ArtifactStore(str(tmp_path / "artifacts"), 1 << 30)
    registry.create_model(ModelSpec(MODEL, owner="risk"), "tester")
    spec = VersionSpec(MODEL, "onnx", hashlib.sha256(models.good).hexdigest(), len(models.good), signature=signature())

    async def chunks() -> AsyncIterator[bytes]:
        yield models.good

    await VersionUploads(registry, store).upload(spec, chunks(), "tester")
    async with aio.insecure_channel(features.address) as channel:
        yield World(registry, store, FeatureCatalog(channel, features.address))
    registry.close()


def promotions(world: World, fleet: object) -> Promotions:
    runner = GateRunner(
        world.registry,
        world.store,
        aio.insecure_channel,
        world.catalog,
        fleet,  # type: ignore[arg-type]  # the Protocol is structural; these test objects satisfy it
        latency_samples=50,
        latency_warmup=5,
    )
    return Promotions(world.registry, OperationStore(world.registry.engine), runner, rpb.PromotionGates())


async def finished(promoting: Promotions, request: PromoteRequest) -> rpb.Operation:
    started = await promoting.start(request, "tester")
    seen = [operation async for operation in promoting.watch(started.operation_id)]
    assert seen[-1].done
    return seen[-1]


def by_name(operation: rpb.Operation) -> dict[str, rpb.GateResult]:
    return {r.name: r for r in operation.gate_results}


async def test_a_good_candidate_passes_every_gate_and_becomes_candidate(
    world: World, predictor: ServiceProcess, models: Models
) -> None:
    fleet = PredictorAt(endpoint(predictor))
    gates = rpb.PromotionGates(
        schema=rpb.SchemaGate(check_feature_refs=True, require_output_compatibility=True),
        backtest=backtest_gate(models.dataset, dataset_sha256=models.dataset_sha256),
        # A generous bound: the point is that the gate measured on the predictor, not how fast it is.
        latency=rpb.LatencyGate(p99_budget_ms=60_000, sample_requests=40, warmup_requests=5, batch_size=4),
    )
    operation = await finished(promotions(world, fleet), PromoteRequest(MODEL, 1, gates=gates, reason="nightly"))
    checks = by_name(operation)
    assert all(r.passed for r in operation.gate_results), [r.detail for r in operation.gate_results if not r.passed]
    assert {"schema.artifact", "schema.feature_refs", "backtest.dataset", "latency.p99"} <= set(checks)
    latency = checks["latency.p99"]
    assert latency.type == rpb.GATE_TYPE_LATENCY
    assert 0 < latency.measured_value <= latency.threshold
    assert "40 requests of 4 rows" in latency.detail
    assert fleet.loads == [(MODEL, 1, 1)]
    assert (operation.state, operation.stage) == (rpb.OPERATION_STATE_SUCCEEDED, rpb.MODEL_STAGE_CANDIDATE)
    stored = world.registry.get_version(MODEL, 1)
    assert stored.stage is Stage.CANDIDATE
    assert [r.name for r in stored.gate_results] == list(checks)


async def test_a_budget_below_any_round_trip_fails_with_the_measured_p99(
    world: World, predictor: ServiceProcess
) -> None:
    fleet = PredictorAt(endpoint(predictor))
    gates = rpb.PromotionGates(latency=rpb.LatencyGate(p99_budget_ms=1e-6, sample_requests=20, warmup_requests=2))
    operation = await finished(promotions(world, fleet), PromoteRequest(MODEL, 1, gates=gates, dry_run=True))
    latency = by_name(operation)["latency.p99"]
    assert not latency.passed
    assert latency.measured_value > latency.threshold == 1e-6
    assert latency.detail.startswith("p99 ")
    assert "> budget 1e-06 ms" in latency.detail
    assert world.registry.get_version(MODEL, 1).stage is Stage.REGISTERED  # a dry run moves nothing


@pytest.mark.parametrize(
    ("fleet", "detail"),
    [
        (None, "error: no predictor fleet to measure on"),
        (NoRoom(), "error: cannot load churn v1 on a predictor: no predictor has room for 64 MiB"),
    ],
)
async def test_a_latency_gate_that_cannot_measure_fails_and_rejects(world: World, fleet: object, detail: str) -> None:
    gates = rpb.PromotionGates(latency=rpb.LatencyGate(p99_budget_ms=100))
    operation = await finished(promotions(world, fleet), PromoteRequest(MODEL, 1, gates=gates))
    assert by_name(operation)["latency.p99"].detail == detail
    assert (operation.state, operation.stage) == (rpb.OPERATION_STATE_FAILED, rpb.MODEL_STAGE_REJECTED)
