"""An in-process model manager for the rollout tests, with small in-test implementations of the two ports it needs
(the predictor fleet and the gateways' route hub), a registry model with versions, and metric windows."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Set
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from grpc import aio

from chassis.errors import FailedPrecondition
from fresco.api.features.v1 import statistics_pb2 as spb
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as pb_grpc
from fresco.api.models.v1 import rollout_pb2 as rpb
from fresco.api.models.v1 import routing_pb2 as rtpb
from model_manager.lifecycle import Stage
from model_manager.records import ModelSpec, VersionSpec
from model_manager.registry import Registry
from model_manager.routes import Endpoint, RouteTable
from model_manager.server import ModelManager, build_server
from model_manager.settings import ModelManagerSettings
from model_manager.windows import LATENCY_BOUNDS_MS
from tests.model_manager.registry_support import artifact, signature

if TYPE_CHECKING:
    Stub: TypeAlias = pb_grpc.ModelManagerServiceAsyncStub


@dataclass
class LocalFleet:
    """Predictors as a dict: a load makes a version warm on one endpoint at once (or fails, if told to)."""

    warm: dict[tuple[str, int], tuple[Endpoint, ...]] = field(default_factory=dict)
    refuse: set[int] = field(default_factory=set)
    released: list[tuple[str, int]] = field(default_factory=list)
    callbacks: list[Callable[[], None]] = field(default_factory=list)
    placements: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)  # (replicas, max_replicas) asked
    sick: set[int] = field(default_factory=set)  # versions the fleet placed whose predictors are not ready
    retained: frozenset[tuple[str, int]] = frozenset()

    async def ensure_loaded(
        self, model: str, version: int, *, replicas: int = 1, max_replicas: int = 0
    ) -> tuple[Endpoint, ...]:
        self.placements[(model, version)] = (replicas, max_replicas)
        if version in self.refuse:
            raise FailedPrecondition(f"no predictor has room for {model} version {version}")
        self.warm[(model, version)] = (Endpoint("127.0.0.1", 9000 + version),)
        return self.warm[(model, version)]

    def warm_endpoints(self, model: str, version: int) -> tuple[Endpoint, ...]:
        return () if version in self.sick else self.warm.get((model, version), ())

    def changed(self) -> None:
        """Tell the manager some version's warm endpoints changed, as the fleet does on a heartbeat."""
        for callback in self.callbacks:
            callback()

    def predictor_model_name(self, model: str, version: int) -> str:
        return model

    async def release(self, model: str, version: int) -> None:
        self.warm.pop((model, version), None)
        self.released.append((model, version))

    def on_change(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)

    def retain(self, wanted: Set[tuple[str, int]]) -> None:
        self.retained = frozenset(wanted)


@dataclass
class LocalHub:
    """A route hub whose one gateway accepts every revision as soon as it is published."""

    table: RouteTable = field(default_factory=lambda: RouteTable(0))
    published: list[RouteTable] = field(default_factory=list)
    callbacks: list[Callable[[], None]] = field(default_factory=list)
    acked: int = 0
    seeded: RouteTable | None = None

    def publish(self, table: RouteTable) -> None:
        assert table.revision > self.table.revision, "revisions must grow"
        self.table = table
        self.published.append(table)
        self.acked = table.revision
        for callback in self.callbacks:
            asyncio.get_running_loop().call_soon(callback)

    def seed(self, table: RouteTable, changed_at: Mapping[str, int]) -> None:
        assert self.table.revision == 0, "seeded only before any publish"
        self.table = self.seeded = table
        self.acked = table.revision  # its gateway holds the table it was seeded with

    def changed_at(self) -> dict[str, int]:
        return {}

    def applied_revision(self, model: str) -> int:
        return self.acked if any(r.model == model for r in self.table.routes) else 0

    async def wait_applied(self, model: str, revision: int, timeout: float) -> bool:  # noqa: ASYNC109
        return self.applied_revision(model) >= revision

    def rejections(self, model: str) -> list[tuple[str, int, str]]:
        return []

    def on_ack(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)

    def weights(self, model: str) -> dict[str, int]:
        """The current table's weights of the model's versions."""
        return {v.version: v.weight for v in self.table.route(model).versions}


@asynccontextmanager
async def manager(
    data_dir: Path, fleet: LocalFleet, hub: LocalHub, **settings_fields: object
) -> AsyncIterator[tuple[ModelManager, Stub]]:
    """A model manager in this process on `data_dir`, ready, and a stub to it."""
    settings = ModelManagerSettings(data_dir=data_dir, port=0, metrics_port=-1, **settings_fields)  # type: ignore[arg-type]
    mm = build_server(settings, fleet, hub)
    await mm.app.start()
    await mm.ready()
    channel = aio.insecure_channel(mm.app.address)
    try:
        yield mm, pb_grpc.ModelManagerServiceStub(channel)
    finally:
        await channel.close()
        await mm.app.stop(0)


def make_model(registry: Registry, *, production: int = 1, candidates: tuple[int, ...] = (2,)) -> str:
    """A model with a production version and candidate versions (their gates passed)."""
    name = f"m-{uuid.uuid4().hex[:8]}"
    registry.create_model(ModelSpec(name=name, owner="risk", signature=signature()), "tester")
    for v in sorted({production, *candidates}):
        content = f"{name}-{v}".encode()
        spec = VersionSpec(
            model_name=name, version=v, format="onnx", expected_sha256=artifact(content).sha256, signature=signature()
        )
        registry.register_version(spec, artifact(content), "tester")
        for stage in (Stage.VALIDATING, Stage.CANDIDATE):
            registry.set_stage(name, v, stage, "tester")
    registry.set_stage(name, production, Stage.PRODUCTION, "tester")
    return name


def window(model: str, version: int, revision: int, counts: dict[str, int], *, wid: str = "") -> rtpb.MetricsWindow:
    """A ten-second window that ended just now, latencies all in the 5 ms bucket."""
    end = time.time() - 0.001
    hist = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    hist[LATENCY_BOUNDS_MS.index(5.0)] = sum(counts.values())
    w = rtpb.MetricsWindow(
        model_name=model,
        version=version,
        window_id=wid or uuid.uuid4().hex,
        route_revision=revision,
        status_counts=counts,
        latency=rtpb.LatencySummary(histogram=spb.Histogram(bucket_bounds=LATENCY_BOUNDS_MS, bucket_counts=hist)),
    )
    w.window_start.FromNanoseconds(int((end - 10) * 1e9))
    w.window_end.FromNanoseconds(int(end * 1e9))
    return w


def canary(*steps: rpb.CanaryStep, interval_s: float = 0.2, **thresholds: object) -> rpb.RolloutStrategy:
    """A canary strategy; thresholds become its analysis (none: no analysis)."""
    c = rpb.CanaryStrategy(steps=steps)
    c.analysis_interval.FromNanoseconds(int(interval_s * 1e9))
    if thresholds:
        c.analysis.CopyFrom(rpb.AnalysisThresholds(**thresholds))  # type: ignore[arg-type]
    return rpb.RolloutStrategy(canary=c)


async def wait_for(
    read: Callable[[], Awaitable[rpb.Rollout]], done: Callable[[rpb.Rollout], bool], within_s: float = 20.0
) -> rpb.Rollout:
    """Reads the rollout until `done` holds; fails with the last status after `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while True:
        rollout = await read()
        if done(rollout):
            return rollout
        if time.monotonic() > deadline:
            raise AssertionError(f"rollout never got there; last: {rollout}")
        await asyncio.sleep(0.02)


def status(stub: Stub, rollout_id: str) -> Callable[[], Awaitable[rpb.Rollout]]:
    """A reader of the rollout's status."""

    async def read() -> rpb.Rollout:
        return (await stub.GetRolloutStatus(pb.GetRolloutStatusRequest(rollout_id=rollout_id))).rollout

    return read


def applied(r: rpb.Rollout) -> bool:
    """The rollout's current step is acknowledged by the gateways."""
    return r.published_revision > 0 and r.applied_revision == r.published_revision
