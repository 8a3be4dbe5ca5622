"""Copies nobody wants leave the predictors: what the latency gate loaded for a rejected version or a dry run (unless
a route uses it), and, after a manager restart, copies no route, rollout or gate wants, once their grace is over.
Real predictor processes join a real model manager served in this process."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc import aio

from fresco.api.common.v1 import values_pb2
from fresco.api.features.v1 import statistics_pb2 as spb
from fresco.api.gateway.v1 import gateway_pb2 as gpb
from fresco.api.gateway.v1 import gateway_pb2_grpc as gpb_grpc
from fresco.api.inference import grpc_service_pb2 as ipb
from fresco.api.inference import grpc_service_pb2_grpc as ipb_grpc
from fresco.api.models.v1 import fleet_pb2 as fpb
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as pb_grpc
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.api.models.v1 import rollout_pb2 as ro
from fresco.servers._process import free_port
from fresco.story import SCORE_BOUNDS, score_statistics
from fresco.suite import ServiceProcess
from fresco.training import ExportedModel, train_classifier, write_failing_model
from model_manager.fleet import Fleet
from model_manager.lifecycle import Stage
from model_manager.server import ModelManager, build_server
from model_manager.settings import ModelManagerSettings
from tests.integration import CLIENT_OPTIONS, features_of
from tests.model_manager.fleet_support import eventually, start_predictor
from tests.model_manager.gateway_world import start_gateway

pytestmark = pytest.mark.integration

GRACE_S = 1.0
PREDICTORS = ("w1", "w2")


@dataclass
class World:
    """The manager (replaced when a test restarts it), the predictors and a trained model."""

    settings: ModelManagerSettings
    manager: ModelManager
    channel: aio.Channel
    predictors: dict[str, ServiceProcess]
    model: ExportedModel

    @property
    def fleet(self) -> Fleet:
        assert self.manager.own_fleet is not None
        return self.manager.own_fleet

    @property
    def stub(self) -> pb_grpc.ModelManagerServiceAsyncStub:
        return pb_grpc.ModelManagerServiceStub(self.channel)  # type: ignore[return-value]

    async def restart(self) -> None:
        """Stop the manager and start another on the same database and port; predictors register again."""
        await self.manager.app.stop(grace=1.0)
        self.manager = await started(self.settings)


async def started(settings: ModelManagerSettings) -> ModelManager:
    manager = build_server(settings)
    await manager.app.start()
    await manager.ready()
    await manager.app.set_serving(True)
    return manager


@pytest.fixture(scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    base = tmp_path_factory.mktemp("wants")
    model = train_classifier(base / "trained", "w", 1, seed=11)
    settings = ModelManagerSettings(
        data_dir=base / "manager",
        port=free_port(),  # fixed, so the predictors find the manager again after a restart
        metrics_port=-1,
        heartbeat_interval_s=0.3,
        predictor_lease_s=6.0,
        leftover_grace_s=GRACE_S,
        metrics_window_s=1.0,  # gateways report score histograms every second
    )
    manager = await started(settings)
    repository = base / "empty-repository"
    repository.mkdir()
    predictors: dict[str, ServiceProcess] = {}
    channel = aio.insecure_channel(manager.app.address, options=CLIENT_OPTIONS)
    world = World(settings, manager, channel, predictors, model)
    try:
        for pid in PREDICTORS:
            predictors[pid] = await asyncio.to_thread(start_predictor, repository, manager.app.address, pid)
        yield world
    finally:
        for process in predictors.values():
            await asyncio.to_thread(process.stop)
        await channel.close()
        await world.manager.app.stop(grace=1.0)


@contextlib.contextmanager
def inference(address: str) -> Iterator[ipb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(address, options=CLIENT_OPTIONS) as channel:
        yield ipb_grpc.GRPCInferenceServiceStub(channel)


def loaded_anywhere(world: World) -> set[str]:
    """The model names loaded and ready on any predictor, as the predictors themselves say."""
    names: set[str] = set()
    for process in world.predictors.values():
        with inference(process.address) as stub:
            index = stub.RepositoryIndex(ipb.RepositoryIndexRequest(ready=True), timeout=10)
        names.update(m.name for m in index.models)
    return names


async def ready(world: World) -> bool:
    reply = await world.stub.ListPredictors(pb.ListPredictorsRequest())
    return len([p for p in reply.predictors if p.state == fpb.PREDICTOR_STATE_READY]) == len(PREDICTORS)


def signature(model: ExportedModel) -> rpb.ModelSignature:
    """What the trained classifier serves, its input fed from named features: the latency gate and the gateway
    send inputs by it."""
    return rpb.ModelSignature(
        inputs=[rpb.TensorSpec(name=model.input_name, datatype="FP32", shape=[-1, len(model.feature_names)])],
        outputs=[
            rpb.TensorSpec(name="label", datatype="INT64", shape=[-1]),
            rpb.TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 2]),
        ],
        feature_refs=model.feature_names,
        feature_input=model.input_name,
    )


async def create(world: World, name: str, static: rpb.StaticFallback | None = None) -> None:
    model = rpb.Model(name=name, owner="fleet-tests", signature=signature(world.model), static_fallback=static)
    await world.stub.CreateModel(pb.CreateModelRequest(model=model))


async def register_version(
    world: World, name: str, path: Path | None = None, stats: spb.FeatureStatistics | None = None
) -> int:
    """The trained classifier (or the artifact at `path`) as the next version of the model, with its signature
    and the given training statistics."""
    content = (path or world.model.path).read_bytes()
    meta = pb.UploadModelVersionMetadata(
        model_name=name,
        format=rpb.MODEL_FORMAT_ONNX,
        expected_sha256=hashlib.sha256(content).hexdigest(),
        signature=signature(world.model),
        training_statistics=[stats] if stats is not None else [],
    )

    async def chunks() -> AsyncIterator[pb.UploadModelVersionRequest]:
        yield pb.UploadModelVersionRequest(metadata=meta)
        yield pb.UploadModelVersionRequest(chunk=content)

    return int((await world.stub.UploadModelVersion(chunks())).model_version.version)


async def promoted(world: World, name: str, version: int, budget_ms: float, *, dry_run: bool) -> rpb.Operation:
    """Run a latency gate (with `budget_ms`) on the version and return the finished operation."""
    gates = rpb.PromotionGates(latency=rpb.LatencyGate(p99_budget_ms=budget_ms, sample_requests=10, warmup_requests=1))
    request = pb.PromoteModelVersionRequest(
        model_name=name, version=version, target_stage=rpb.MODEL_STAGE_CANDIDATE, gates=gates, dry_run=dry_run
    )
    started_op = (await world.stub.PromoteModelVersion(request)).operation

    async def done() -> rpb.Operation | None:
        op = (await world.stub.GetOperation(pb.GetOperationRequest(operation_id=started_op.operation_id))).operation
        return op if op.done else None

    return await eventually(done, 60, "the promotion finished")


async def test_a_version_rejected_by_its_latency_gate_is_unloaded(world: World) -> None:
    await eventually(lambda: ready(world), what="both predictors READY")
    await create(world, "rejected")
    version = await register_version(world, "rejected")
    name = world.fleet.predictor_model_name("rejected", version)
    operation = await promoted(world, "rejected", version, 1e-6, dry_run=False)
    assert operation.stage == rpb.MODEL_STAGE_REJECTED
    latency = next(r for r in operation.gate_results if r.name == "latency.p99")
    assert latency.detail.startswith("p99 "), "it was loaded and measured on a predictor"
    assert world.fleet.warm_endpoints("rejected", version) == ()
    assert name not in await asyncio.to_thread(loaded_anywhere, world)


async def test_a_dry_run_unloads_what_it_measured_unless_a_route_uses_it(world: World) -> None:
    await eventually(lambda: ready(world), what="both predictors READY")
    await create(world, "dry")
    v1 = await register_version(world, "dry")
    v2 = await register_version(world, "dry")
    registry, controller = world.manager.registry, world.manager.controller
    assert registry is not None
    assert controller is not None
    for stage in (Stage.VALIDATING, Stage.CANDIDATE, Stage.PRODUCTION):
        registry.set_stage("dry", v1, stage, "tester")
    controller.wake()
    await eventually(lambda: asyncio.sleep(0, world.fleet.warm_endpoints("dry", v1)), what="production warm")

    used = await promoted(world, "dry", v1, 60_000, dry_run=True)
    assert used.passed
    assert world.fleet.warm_endpoints("dry", v1), "production serves: the gate leaves it loaded"
    measured = await promoted(world, "dry", v2, 60_000, dry_run=True)
    assert measured.passed
    assert world.fleet.warm_endpoints("dry", v2) == ()
    names = await asyncio.to_thread(loaded_anywhere, world)
    assert world.fleet.predictor_model_name("dry", v2) not in names
    assert world.fleet.predictor_model_name("dry", v1) in names


async def test_after_a_restart_copies_nobody_wants_are_unloaded_and_wanted_ones_stay(world: World) -> None:
    await eventually(lambda: ready(world), what="both predictors READY")
    await create(world, "leftover")
    v1 = await register_version(world, "leftover")
    v2 = await register_version(world, "leftover")
    registry = world.manager.registry
    assert registry is not None
    for stage in (Stage.VALIDATING, Stage.CANDIDATE, Stage.PRODUCTION):
        registry.set_stage("leftover", v1, stage, "tester")
    # v2 loaded as a rollout would, then the manager goes away: the new one knows nothing of who wanted it.
    await world.fleet.ensure_loaded("leftover", v2, replicas=2)
    wanted_name, leftover_name = (world.fleet.predictor_model_name("leftover", v) for v in (v1, v2))
    await world.restart()
    await eventually(lambda: ready(world), what="both predictors registered again")

    async def swept() -> bool:
        return leftover_name not in await asyncio.to_thread(loaded_anywhere, world)

    await eventually(swept, 60, "the leftover copy unloaded")
    assert wanted_name in await asyncio.to_thread(loaded_anywhere, world), "production stays loaded"
    assert world.fleet.warm_endpoints("leftover", v1)


async def test_the_gateway_answers_the_models_static_answer_when_its_version_fails(
    world: World, tmp_path: Path
) -> None:
    await eventually(lambda: ready(world), what="both predictors READY")
    # Production fails at run time on rows with |x0| >= 0.5; the model's static answer stands in for it.
    broken = write_failing_model(world.model, tmp_path / "broken", 3)
    static = rpb.StaticFallback(
        outputs={
            "label": values_pb2.Value(int64_value=0),
            "probabilities": values_pb2.Value(double_list=values_pb2.DoubleList(values=[0.5, 0.5])),
        }
    )
    await create(world, "answered", static)
    v1 = await register_version(world, "answered", broken.path)
    registry, controller = world.manager.registry, world.manager.controller
    assert registry is not None
    assert controller is not None
    for stage in (Stage.VALIDATING, Stage.CANDIDATE, Stage.PRODUCTION):
        registry.set_stage("answered", v1, stage, "tester")
    controller.wake()
    gateway = await start_gateway(world.manager.app.address, tmp_path / "gateway-state")
    try:
        async with aio.insecure_channel(gateway.address, options=CLIENT_OPTIONS) as channel:
            stub = gpb_grpc.GatewayServiceStub(channel)
            rows = world.model.sample
            good = next(r for r in rows if abs(r[0]) < 0.5)
            bad = next(r for r in rows if abs(r[0]) >= 0.5)

            async def served() -> gpb.PredictResponse | None:
                try:
                    answer = await stub.Predict(gpb.PredictRequest(model="answered", features=features_of(good)))
                except aio.AioRpcError:
                    return None  # the gateway has no route for it yet
                return answer if answer.model_version == str(v1) else None

            answer = await eventually(served, 60, "the gateway serves production")
            assert answer is not None
            assert not answer.fallback
            failed = await stub.Predict(gpb.PredictRequest(model="answered", features=features_of(bad)), timeout=30)
            assert failed.fallback
            assert f"version {v1} failed" in failed.fallback_reason
            assert failed.model_version == ""
            assert list(failed.outputs["label"].int64_values) == [0]
            assert list(failed.outputs["probabilities"].double_values) == [0.5, 0.5]
    finally:
        await asyncio.to_thread(gateway.stop)


@pytest.mark.parametrize("drifted", [False, True])
async def test_score_psi_judges_a_canary_on_live_traffic_through_the_gateway(
    world: World, tmp_path: Path, drifted: bool
) -> None:
    """Both versions are the same classifier; the drifted candidate's training statistics describe a population
    unlike live traffic (rows negated), so its live scores drift from them."""
    await eventually(lambda: ready(world), what="both predictors READY")
    rows = world.model.sample
    name = f"drift-{int(drifted)}"
    await create(world, name)
    trained = score_statistics(world.model.path, rows)
    v1 = await register_version(world, name, stats=trained)
    v2 = await register_version(world, name, stats=score_statistics(world.model.path, -rows) if drifted else trained)
    registry = world.manager.registry
    assert registry is not None
    for v in (v1, v2):
        for stage in (Stage.VALIDATING, Stage.CANDIDATE):
            registry.set_stage(name, v, stage, "tester")
    registry.set_stage(name, v1, Stage.PRODUCTION, "tester")
    gateway = await start_gateway(world.manager.app.address, tmp_path / "gateway-state")
    stop = asyncio.Event()
    try:
        async with aio.insecure_channel(gateway.address, options=CLIENT_OPTIONS) as channel:
            stub = gpb_grpc.GatewayServiceStub(channel)

            async def traffic() -> None:
                i = 0
                while not stop.is_set():  # a steady stream of units, cycling over the training rows
                    request = gpb.PredictRequest(model=name, features=features_of(rows[i % len(rows)]), unit_id=f"u{i}")
                    with contextlib.suppress(aio.AioRpcError):  # no route yet
                        await stub.Predict(request, timeout=30)
                    i += 1

            sender = asyncio.create_task(traffic())
            analysis = ro.AnalysisThresholds(max_prediction_psi=0.1, min_samples=100)
            strategy = ro.RolloutStrategy(
                canary=ro.CanaryStrategy(steps=[ro.CanaryStep(traffic_percent=50)], analysis=analysis)
            )
            strategy.canary.analysis_interval.FromSeconds(1)
            deployed = await world.stub.DeployModelVersion(
                pb.DeployModelVersionRequest(model_name=name, version=v2, strategy=strategy)
            )
            rid = deployed.rollout.rollout_id

            async def finished() -> ro.Rollout | None:
                reply = await world.stub.GetRolloutStatus(pb.GetRolloutStatusRequest(rollout_id=rid))
                done = (ro.ROLLOUT_STATE_SUCCEEDED, ro.ROLLOUT_STATE_ROLLED_BACK, ro.ROLLOUT_STATE_FAILED)
                return reply.rollout if reply.rollout.state in done else None

            rollout = await eventually(finished, 120, "the canary was judged")
            stop.set()
            await sender
    finally:
        stop.set()
        await asyncio.to_thread(gateway.stop)
    assert rollout is not None
    route = world.manager.route_hub.table.route(name)
    assert (route.score_output, route.score_bounds) == ("probabilities", SCORE_BOUNDS)
    checks = [d for e in rollout.events for d in e.decisions if d.check == ro.ANALYSIS_CHECK_PREDICTION_PSI]
    assert checks, rollout.events
    if not drifted:
        assert rollout.state == ro.ROLLOUT_STATE_SUCCEEDED, rollout.message
        assert all(d.verdict == ro.ANALYSIS_VERDICT_PASSED for d in checks)
        return
    assert rollout.state == ro.ROLLOUT_STATE_ROLLED_BACK, rollout.message
    failed = [d for d in checks if d.verdict == ro.ANALYSIS_VERDICT_FAILED]
    assert failed
    assert failed[0].measured_value > failed[0].threshold
    assert failed[0].sample_count >= 100
    assert "psi" in rollout.message.lower()
