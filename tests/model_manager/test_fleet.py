"""The fleet end to end: real predictor processes join a real model manager (served in this process, so the test
can call its `Fleet` as the rollout controller does); registered ONNX versions are placed, loaded, served and
released; a killed predictor's lease runs out; auth between them is on throughout."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc import aio

from chassis.errors import FailedPrecondition, NotFound
from fresco.api.inference import grpc_service_pb2 as ipb
from fresco.api.inference import grpc_service_pb2_grpc as ipb_grpc
from fresco.api.models.v1 import fleet_pb2 as fpb
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as pb_grpc
from fresco.suite import ServiceProcess
from fresco.training import ExportedModel, train_classifier
from model_manager.fleet import Fleet
from model_manager.routes import Endpoint
from model_manager.server import ModelManager, build_server
from model_manager.settings import ModelManagerSettings
from tests.integration import CLIENT_OPTIONS, Reference, decode_outputs, infer_request
from tests.model_manager.fleet_support import Tokens, eventually, issue_tokens, register_version, start_predictor

pytestmark = pytest.mark.integration

LEASE_S = 6.0  # generous: a busy 2-core machine must not lose a live predictor
COPY_RATE = 5.0  # requests/s one copy serves before another is placed
ZONES = {"p1": "zone-a", "p2": "zone-b", "p3": "zone-a"}


@dataclass
class World:
    """The manager, its fleet, the shared predictors and the trained models."""

    manager: ModelManager
    fleet: Fleet
    stub: pb_grpc.ModelManagerServiceAsyncStub
    admin: tuple[tuple[str, str], ...]
    predictors: dict[str, ServiceProcess]
    tokens: Tokens
    repository: Path
    logs: Path
    models: list[ExportedModel]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> list[ExportedModel]:
    """Two different classifiers (seeds 7 and 8) over the same 8 inputs."""
    root = tmp_path_factory.mktemp("trained")
    return [train_classifier(root, f"m{seed}", 1, seed=seed) for seed in (7, 8)]


@pytest.fixture(scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory, trained: list[ExportedModel]) -> AsyncIterator[World]:
    base = tmp_path_factory.mktemp("fleet")
    tokens = issue_tokens(base)
    settings = ModelManagerSettings(
        data_dir=base / "manager",
        port=0,
        metrics_port=-1,
        heartbeat_interval_s=0.3,
        predictor_lease_s=LEASE_S,
        copy_request_rate=COPY_RATE,
        auth_tokens_file=tokens.file,
        peer_token_file=tokens.manager,
    )
    manager = build_server(settings)
    await manager.app.start()
    await manager.ready()
    await manager.app.set_serving(True)
    repository = base / "empty-repository"
    repository.mkdir()
    logs = base / "logs"
    logs.mkdir()
    predictors: dict[str, ServiceProcess] = {}
    channel = aio.insecure_channel(manager.app.address, options=CLIENT_OPTIONS)
    try:
        for pid, zone in ZONES.items():
            predictors[pid] = await asyncio.to_thread(
                start_predictor, repository, manager.app.address, pid, zone=zone, tokens=tokens, log_dir=logs
            )
        assert manager.fleet is not None
        stub: pb_grpc.ModelManagerServiceAsyncStub = pb_grpc.ModelManagerServiceStub(channel)  # type: ignore[assignment]
        admin = (("authorization", f"Bearer {tokens.admin}"),)
        yield World(manager, manager.fleet, stub, admin, predictors, tokens, repository, logs, trained)
    finally:
        for process in predictors.values():
            await asyncio.to_thread(process.stop)
        await channel.close()
        await manager.app.stop(grace=1.0)


async def listed(world: World) -> dict[str, fpb.PredictorInfo]:
    reply = await world.stub.ListPredictors(pb.ListPredictorsRequest(), metadata=world.admin)
    return {p.predictor_id: p for p in reply.predictors}


async def all_ready(world: World, ids: set[str]) -> bool:
    found = await listed(world)
    return all(pid in found and found[pid].state == fpb.PREDICTOR_STATE_READY for pid in ids)


@contextlib.contextmanager
def inference(address: str) -> Iterator[ipb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(address, options=CLIENT_OPTIONS) as channel:
        yield ipb_grpc.GRPCInferenceServiceStub(channel)


def infer(endpoint: Endpoint, name: str, version: int, rows: np.ndarray) -> dict[str, np.ndarray]:
    with inference(endpoint.address) as stub:
        reply = stub.ModelInfer(infer_request(rows, model=name, version=str(version)), timeout=30)
    assert (reply.model_name, reply.model_version) == (name, str(version))
    return decode_outputs(reply)


def loaded_names(address: str) -> set[str]:
    with inference(address) as stub:
        index = stub.RepositoryIndex(ipb.RepositoryIndexRequest(ready=True), timeout=10)
    return {m.name for m in index.models}


async def test_predictors_register_with_zone_memory_and_boot(world: World) -> None:
    await eventually(lambda: all_ready(world, set(ZONES)), what="every predictor READY")
    found = await listed(world)
    for pid, zone in ZONES.items():
        info = found[pid]
        assert info.address == world.predictors[pid].address
        assert (info.zone, info.memory_capacity_bytes, info.healthy) == (zone, 1 << 30, True)
        assert len(info.boot_id) == 32
        assert info.last_heartbeat_at.ToNanoseconds() >= info.registered_at.ToNanoseconds() > 0
    first = await world.stub.ListPredictors(pb.ListPredictorsRequest(page_size=2), metadata=world.admin)
    rest = await world.stub.ListPredictors(
        pb.ListPredictorsRequest(page_token=first.next_page_token), metadata=world.admin
    )
    assert [p.predictor_id for p in [*first.predictors, *rest.predictors]][:3] == ["p1", "p2", "p3"]


async def test_a_version_is_placed_on_k_of_n_spread_across_zones_and_serves(world: World) -> None:
    await eventually(lambda: all_ready(world, set(ZONES)), what="every predictor READY")
    model = world.models[0]
    version = await register_version(world.stub, "placed", model.path.read_bytes(), world.admin)
    changes: list[int] = []
    world.fleet.on_change(lambda: changes.append(1))
    endpoints = await world.fleet.ensure_loaded("placed", version, replicas=2)
    assert len(endpoints) == 2
    assert changes
    assert {e.zone for e in endpoints} == {"zone-a", "zone-b"}  # spread, though zone-a has two predictors
    assert world.fleet.warm_endpoints("placed", version) == endpoints
    name = world.fleet.predictor_model_name("placed", version)
    expected = Reference(model).predict(model.sample[:4])
    for endpoint in endpoints:
        outputs = infer(endpoint, name, version, model.sample[:4])
        np.testing.assert_allclose(outputs["probabilities"], expected["probabilities"], rtol=1e-5)
    holders = {e.address for e in endpoints}
    others = [p.address for p in world.predictors.values() if p.address not in holders]
    assert len(others) == 1
    assert name not in loaded_names(others[0])

    async def reported() -> bool:
        found = await listed(world)
        copies = [m for p in found.values() for m in p.loaded_models if m.predictor_model_name == name]
        return len(copies) == 2 and all(m.model_name == "placed" and m.version == version and m.ready for m in copies)

    await eventually(reported, what="heartbeats report both copies")
    # Asking again changes nothing: the copies are there.
    assert await world.fleet.ensure_loaded("placed", version, replicas=2) == endpoints
    await world.fleet.release("placed", version)


async def test_two_versions_side_by_side_then_release_unloads_one(world: World) -> None:
    await eventually(lambda: all_ready(world, set(ZONES)), what="every predictor READY")
    first, second = world.models
    v1 = await register_version(world.stub, "sidebyside", first.path.read_bytes(), world.admin)
    v2 = await register_version(world.stub, "sidebyside", second.path.read_bytes(), world.admin)
    on_all = await world.fleet.ensure_loaded("sidebyside", v1, replicas=3)
    assert set(await world.fleet.ensure_loaded("sidebyside", v2, replicas=3)) == set(on_all)
    rows = first.sample[:3]
    endpoint = on_all[0]
    one = infer(endpoint, world.fleet.predictor_model_name("sidebyside", v1), v1, rows)
    two = infer(endpoint, world.fleet.predictor_model_name("sidebyside", v2), v2, rows)
    np.testing.assert_allclose(one["probabilities"], Reference(first).predict(rows)["probabilities"], rtol=1e-5)
    np.testing.assert_allclose(two["probabilities"], Reference(second).predict(rows)["probabilities"], rtol=1e-5)
    assert not np.allclose(one["probabilities"], two["probabilities"])

    await world.fleet.release("sidebyside", v1)
    assert world.fleet.warm_endpoints("sidebyside", v1) == ()
    assert set(world.fleet.warm_endpoints("sidebyside", v2)) == set(on_all)
    name1, name2 = (world.fleet.predictor_model_name("sidebyside", v) for v in (v1, v2))
    for address in (e.address for e in on_all):
        names = loaded_names(address)
        assert name1 not in names
        assert name2 in names
    await world.fleet.release("sidebyside", v2)
    assert all(name2 not in loaded_names(e.address) for e in on_all)


async def test_placement_refuses_a_version_no_predictor_has_room_for(world: World) -> None:
    await eventually(lambda: all_ready(world, set(ZONES)), what="every predictor READY")
    content = world.models[0].path.read_bytes()
    version = await register_version(world.stub, "huge", content, world.admin, expected_memory_bytes=2 << 30)
    with pytest.raises(FailedPrecondition) as refused:
        await world.fleet.ensure_loaded("huge", version)
    assert "0 of 1 copies warm" in str(refused.value)
    assert "2048.0 MiB" in str(refused.value)
    assert world.fleet.warm_endpoints("huge", version) == ()
    await world.fleet.release("huge", version)
    with pytest.raises(NotFound):
        await world.fleet.ensure_loaded("huge", version + 5)


async def test_a_killed_predictor_leaves_and_its_restart_gets_the_copy_again(world: World) -> None:
    await eventually(lambda: all_ready(world, set(ZONES)), what="every predictor READY")
    extra = await asyncio.to_thread(
        start_predictor, world.repository, world.manager.app.address, "p4", zone="zone-c", tokens=world.tokens
    )
    try:
        await eventually(lambda: all_ready(world, {"p4"}), what="p4 READY")
        version = await register_version(world.stub, "leased", world.models[0].path.read_bytes(), world.admin)
        endpoints = await world.fleet.ensure_loaded("leased", version, replicas=4)
        assert extra.address in {e.address for e in endpoints}
        changes: list[int] = []
        world.fleet.on_change(lambda: changes.append(1))
        assert extra.process is not None
        extra.process.kill()

        async def dropped() -> bool:
            return extra.address not in {e.address for e in world.fleet.warm_endpoints("leased", version)}

        await eventually(dropped, timeout_s=LEASE_S + 20, what="the killed predictor out of warm endpoints")
        assert changes
        assert len(world.fleet.warm_endpoints("leased", version)) == 3
        assert (await listed(world))["p4"].state == fpb.PREDICTOR_STATE_LOST
        extra.stop()
        # The same replica comes back (a new boot id, nothing loaded): the fleet places the copy on it again.
        extra = await asyncio.to_thread(
            start_predictor, world.repository, world.manager.app.address, "p4", zone="zone-c", tokens=world.tokens
        )

        async def back() -> bool:
            return extra.address in {e.address for e in world.fleet.warm_endpoints("leased", version)}

        await eventually(back, timeout_s=60, what="the copy placed again on the restarted predictor")
        name = world.fleet.predictor_model_name("leased", version)
        assert name in loaded_names(extra.address)
        await world.fleet.release("leased", version)
    finally:
        extra.stop()


async def test_copies_follow_request_rate_up_to_max_replicas_and_back(world: World) -> None:
    await eventually(lambda: all_ready(world, set(ZONES)), what="every predictor READY")
    model = world.models[0]
    version = await register_version(world.stub, "busy", model.path.read_bytes(), world.admin)
    (endpoint,) = await world.fleet.ensure_loaded("busy", version, replicas=1, max_replicas=2)
    name = world.fleet.predictor_model_name("busy", version)
    request = infer_request(model.sample[:1], model=name, version=str(version))
    with inference(endpoint.address) as stub:

        async def copied() -> bool:
            # Back-to-back requests: far over COPY_RATE for one copy, even on a slow machine.
            await asyncio.to_thread(lambda: [stub.ModelInfer(request, timeout=10) for _ in range(30)])
            return len(world.fleet.warm_endpoints("busy", version)) == 2

        await eventually(copied, timeout_s=60, what="a second copy for the traffic")

    async def idle() -> bool:
        return len(world.fleet.warm_endpoints("busy", version)) == 1

    # Without traffic, after the cooldown (the lease), the extra copy goes; `replicas` stays.
    await eventually(idle, timeout_s=60, what="back to one copy without traffic")
    await world.fleet.release("busy", version)


async def test_bad_register_and_heartbeat_input_names_the_field(world: World) -> None:
    good = fpb.PredictorInfo(predictor_id="bad-input", address="127.0.0.1:9", boot_id="b1", healthy=True)
    cases = {
        "predictor.predictor_id": fpb.PredictorInfo(address="127.0.0.1:9", boot_id="b1"),
        "predictor.address": fpb.PredictorInfo(predictor_id="x", address="localhost:9", boot_id="b1"),
        "predictor.boot_id": fpb.PredictorInfo(predictor_id="x", address="127.0.0.1:9"),
        "predictor.memory_capacity_bytes": fpb.PredictorInfo(
            predictor_id="x", address="127.0.0.1:9", boot_id="b1", memory_capacity_bytes=-1
        ),
        "predictor.loaded_models[0].request_rate": fpb.PredictorInfo(
            predictor_id="x",
            address="127.0.0.1:9",
            boot_id="b1",
            loaded_models=[fpb.LoadedModel(predictor_model_name="m.v1", request_rate=float("nan"))],
        ),
        "predictor.loaded_models[0].predictor_model_name": fpb.PredictorInfo(
            predictor_id="x", address="127.0.0.1:9", boot_id="b1", loaded_models=[fpb.LoadedModel(version=1)]
        ),
    }
    for field, info in cases.items():
        for call, request in (
            (world.stub.RegisterPredictor, pb.RegisterPredictorRequest(predictor=info)),
            (world.stub.PredictorHeartbeat, pb.PredictorHeartbeatRequest(predictor=info)),
        ):
            with pytest.raises(aio.AioRpcError) as caught:
                await call(request, metadata=world.admin)  # type: ignore[operator]
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
            assert (caught.value.details() or "").startswith(f"{field}:"), (field, caught.value.details())
    # A heartbeat from a predictor never registered is not an error: it is told to register.
    reply = await world.stub.PredictorHeartbeat(pb.PredictorHeartbeatRequest(predictor=good), metadata=world.admin)
    assert not reply.known
    with pytest.raises(aio.AioRpcError) as caught:
        await world.stub.RegisterPredictor(pb.RegisterPredictorRequest(predictor=good))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
