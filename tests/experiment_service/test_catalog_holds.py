"""The catalog's version holds in a real (in-process) model manager when a change fails to commit after its hold
(another replica of the service committed first, so the stored experiment still runs on what it held before), and
when a release fails (the manager unreachable: it is retried until taken)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from grpc import aio

from chassis.errors import Aborted, Unavailable
from experiment_service import catalog as catalog_module
from experiment_service import lifecycle
from experiment_service.catalog import ExperimentCatalog
from experiment_service.promoter import ModelManagerPromoter, holder
from experiment_service.store import ExperimentStore, now_us
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from model_manager.holds import HoldStore
from model_manager.tables import sqlite_url
from tests.experiment_service.service_support import experiment
from tests.model_manager.rollout_support import LocalFleet, LocalHub, make_model, manager


@dataclass
class Replicas:
    """Replica `a` holds versions in the model manager; `other` (another replica on the same database) commits
    between a's read and its commit when `race` names an experiment."""

    a: ExperimentCatalog
    other: ExperimentStore
    holds: HoldStore
    model: str
    race: str = ""

    def clock(self) -> int:
        at = now_us()
        if self.race:
            key, self.race = self.race, ""
            current = self.other.get(key)
            assert current is not None
            patch = xpb.Experiment(hypothesis="edited meanwhile")
            self.other.commit(lifecycle.update(current, patch, ["hypothesis"], current.version, "bob", at))
        return at

    def held(self, key: str) -> list[int]:
        return [v for h in self.holds.of(self.model) if h.holder == holder(key) for v in h.versions]


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[Replicas]:
    async with manager(tmp_path / "mm", LocalFleet(), LocalHub()) as (mm, _):
        assert mm.registry is not None
        assert mm.controller is not None
        assert mm.controller.holds is not None
        model = make_model(mm.registry, candidates=(2, 3))
        url = sqlite_url(tmp_path / "experiments.db")
        store, other = ExperimentStore.open(url), ExperimentStore.open(url)
        channel = aio.insecure_channel(mm.app.address)
        r = Replicas(ExperimentCatalog(store), other, mm.controller.holds, model)
        r.a = ExperimentCatalog(store, clock=r.clock)
        r.a.holds = ModelManagerPromoter(channel, mm.app.address)
        await r.a.load()
        try:
            yield r
        finally:
            await channel.close()
            store.close()
            other.close()


async def test_a_start_that_loses_the_race_holds_nothing(replicas: Replicas) -> None:
    r = replicas
    created = await r.a.create(experiment("lost-start", model_name=r.model), "alice")
    r.race = created.key
    with pytest.raises(Aborted):
        await r.a.start(created.key, created.version, "alice")
    stored = await r.a.get(created.key)
    assert stored is not None
    assert stored.status == xpb.EXPERIMENT_STATUS_DRAFT
    assert r.held(created.key) == []  # a draft holds nothing: the versions may unload


async def test_an_arm_change_that_loses_the_race_keeps_the_running_arms_held(replicas: Replicas) -> None:
    r = replicas
    created = await r.a.create(experiment("lost-update", model_name=r.model), "alice")
    running = await r.a.start(created.key, created.version, "alice")
    assert r.held(created.key) == [1, 2]
    patch = xpb.Experiment(
        arms=[xpb.Arm(name="arm0", weight=0.5, model_version=1), xpb.Arm(name="arm1", weight=0.5, model_version=3)]
    )
    r.race = created.key
    with pytest.raises(Aborted):
        await r.a.update(created.key, patch, ["arms"], running.version, "alice")
    stored = await r.a.get(created.key)
    assert stored is not None
    assert [a.model_version for a in stored.arms] == [1, 2]
    assert r.held(created.key) == [1, 2]  # the arms still route to 1 and 2: both stay warm and routable


async def test_a_start_cancelled_while_it_commits_is_still_published(tmp_path: Path) -> None:
    # A caller's deadline cancels the RPC while the commit runs in its worker thread, which commits all the same:
    # the running experiment must still reach the configuration gateways assign from.
    store = ExperimentStore.open(sqlite_url(tmp_path / "experiments.db"))
    loop = asyncio.get_running_loop()
    task: asyncio.Task[xpb.Experiment] | None = None
    armed = False

    def clock() -> int:  # called as the change is made, right before it commits
        nonlocal armed
        armed = task is not None
        return now_us()

    def began(_: object) -> None:  # in the commit's worker thread: the caller goes away while it commits
        nonlocal armed
        if armed and task is not None:
            armed = False
            loop.call_soon_threadsafe(task.cancel)

    sa.event.listen(store.engine, "begin", began)
    catalog = ExperimentCatalog(store, clock=clock)
    await catalog.load()
    try:
        created = await catalog.create(experiment("cancelled"), "alice")
        task = asyncio.create_task(catalog.start(created.key, created.version, "alice"))
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = time.monotonic() + 10
        while [e.key for e in catalog.config().experiments] != ["cancelled"]:
            stored = await catalog.get("cancelled")
            assert time.monotonic() < deadline, f"stored {stored and stored.status}, not published"
            await asyncio.sleep(0.02)
        stored = await catalog.get("cancelled")
        assert stored is not None
        assert stored.status == xpb.EXPERIMENT_STATUS_RUNNING
    finally:
        store.close()


class FlakyHolds:
    """The real holds, but the model manager unreachable for the next `down` calls (as the channel reports it)."""

    def __init__(self, real: ModelManagerPromoter, down: int = 0) -> None:
        self.real, self.down, self.calls = real, down, 0

    async def hold(self, model_name: str, experiment_key: str, versions: Sequence[int], reason: str) -> None:
        self.calls += 1
        if self.down:
            self.down -= 1
            raise Unavailable("model manager 127.0.0.1:1: connection refused")
        await self.real.hold(model_name, experiment_key, versions, reason)


async def test_a_release_that_fails_is_retried_until_the_manager_takes_it(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(catalog_module, "RETRY_FIRST_S", 0.05)
    r = replicas
    real = r.a.holds
    assert isinstance(real, ModelManagerPromoter)
    created = await r.a.create(experiment("release-later", model_name=r.model), "alice")
    running = await r.a.start(created.key, created.version, "alice")
    assert r.held(created.key) == [1, 2]
    flaky = FlakyHolds(real, down=2)
    r.a.holds = flaky
    stopped = await r.a.stop(created.key, running.version, "done", "alice")  # the release fails: the stop stands
    assert stopped.status == xpb.EXPERIMENT_STATUS_STOPPED
    assert r.held(created.key) == [1, 2]
    assert r.a.pending_holds() == [created.key]
    deadline = time.monotonic() + 10
    while r.held(created.key):
        assert time.monotonic() < deadline, f"still held after {flaky.calls} attempts"
        await asyncio.sleep(0.02)
    assert flaky.calls == 3  # two refused, the third released
    assert r.a.pending_holds() == []
