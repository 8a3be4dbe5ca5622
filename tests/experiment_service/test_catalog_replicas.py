"""Two replicas of the experiment service on one registry database: the assignment configuration each publishes
holds every running experiment, whichever replica started it."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiment_service.catalog import ExperimentCatalog
from experiment_service.store import ExperimentStore
from fresco.api.experiments.v1 import assignment_pb2 as apb
from model_manager.tables import sqlite_url
from tests.experiment_service.service_support import Gateway, create_and_start, experiment, running, stub_for


async def started(catalog: ExperimentCatalog, key: str) -> None:
    created = await catalog.create(experiment(key), "alice")
    await catalog.start(created.key, created.version, "alice")


def keys(config: apb.AssignmentConfig) -> list[str]:
    return [e.key for e in config.experiments]


async def test_each_replica_publishes_what_the_other_started(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "experiments.db")
    stores = [ExperimentStore.open(url), ExperimentStore.open(url)]
    a, b = (ExperimentCatalog(store) for store in stores)
    published: list[apb.AssignmentConfig] = []
    a.on_publish(published.append)
    try:
        await a.load()
        await b.load()
        await started(b, "on-b")
        await started(a, "on-a")  # a's next revision comes after b's: it holds b's experiment too
        assert (published[-1].revision, keys(published[-1])) == (2, ["on-a", "on-b"])
        assert keys(a.config()) == ["on-a", "on-b"]
        assert len(a.evaluator) == 2

        await started(b, "later-on-b")
        assert await a.refresh()  # a follows the database: its gateways get b's change without a change of a's
        assert (published[-1].revision, keys(published[-1])) == (3, ["later-on-b", "on-a", "on-b"])
        assert not await a.refresh()  # nothing new
        assert published[-1].revision == 3
    finally:
        for store in stores:
            store.close()


@pytest.mark.integration
def test_a_gateway_watching_one_replica_gets_what_the_other_started(tmp_path: Path) -> None:
    shared = ("--database-url", sqlite_url(tmp_path / "experiments.db"), "--follow-s", "0.1")
    with (
        running(tmp_path / "a", *shared) as a,
        running(tmp_path / "b", *shared) as b,
        stub_for(a) as on_a,
        stub_for(b) as on_b,
    ):
        create_and_start(on_a, experiment("first-on-a"))
        gateway = Gateway(on_a, "gw-a")
        try:
            snapshot = gateway.next().snapshot
            assert keys(snapshot) == ["first-on-a"]
            gateway.ack(snapshot.revision)
            create_and_start(on_b, experiment("then-on-b"))  # gw-a watches a, which changed nothing itself
            update = gateway.next().update
            assert (update.base_revision, update.revision) == (snapshot.revision, snapshot.revision + 1)
            assert [e.key for e in update.upserted] == ["then-on-b"]
        finally:
            gateway.close()
