"""The ExperimentCatalog other parts call, on a real SQLite store: bandit re-weighting (a new allocation in the same
phase, version + 1, audited as "bandit", published), decisions, and their refusals."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chassis.errors import Aborted, FailedPrecondition, InvalidArgument
from experiment_service.catalog import ExperimentCatalog
from experiment_service.store import ExperimentStore
from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from model_manager.tables import sqlite_url
from tests.experiment_service.service_support import experiment


@pytest.fixture
async def catalog(tmp_path: Path) -> AsyncIterator[ExperimentCatalog]:
    store = ExperimentStore.open(sqlite_url(tmp_path / "experiments.db"))
    catalog = ExperimentCatalog(store)
    await catalog.load()
    yield catalog
    store.close()


async def started(catalog: ExperimentCatalog, e: xpb.Experiment) -> xpb.Experiment:
    created = await catalog.create(e, "alice")
    return await catalog.start(created.key, created.version, "alice")


async def test_reweighting_is_a_new_allocation_published_and_audited(catalog: ExperimentCatalog) -> None:
    published: list[apb.AssignmentConfig] = []
    catalog.on_publish(published.append)
    bandit = await started(catalog, experiment("bandit", (1, 1, 2), kind=xpb.EXPERIMENT_TYPE_BANDIT))
    after = await catalog.reweight("bandit", 1, (0.1, 0.3, 0.6))
    assert after.version == bandit.version + 1
    assert [a.weight for a in after.arms] == [0.1, 0.3, 0.6]
    assert [(p.number, list(p.weights)) for p in after.phases] == [(1, [1, 1, 2])]  # same phase, its first weights
    assert await catalog.allocations("bandit", 1) == {0: (1.0, 1.0, 2.0), 1: (0.1, 0.3, 0.6)}
    (config,) = published[-1].experiments
    assert (config.allocation, config.version, [a.weight for a in config.arms]) == (1, after.version, [0.1, 0.3, 0.6])
    assert published[-1].revision == published[-2].revision + 1
    entries = await catalog.audit("bandit")
    assert [(e.action, e.identity, e.version) for e in entries][-1] == ("reweight", "bandit", after.version)
    # Read back after a restart: the allocation in force is still the latest.
    assert (await ExperimentCatalog(catalog.store).load()).experiments[0].allocation == 1


async def test_reweighting_refuses_what_is_not_a_running_bandit_phase(catalog: ExperimentCatalog) -> None:
    await started(catalog, experiment("ab"))
    with pytest.raises(FailedPrecondition, match="type: re-weighting needs a BANDIT experiment"):
        await catalog.reweight("ab", 1, (0.5, 0.5))
    await started(catalog, experiment("bandit", kind=xpb.EXPERIMENT_TYPE_BANDIT))
    with pytest.raises(FailedPrecondition, match="phase: expected the current phase 1, got 2"):
        await catalog.reweight("bandit", 2, (0.5, 0.5))
    with pytest.raises(InvalidArgument, match=r"weights: expected one per arm \(2\), got 3"):
        await catalog.reweight("bandit", 1, (0.2, 0.3, 0.5))
    with pytest.raises(InvalidArgument, match="weights: expected non-negative finite weights"):
        await catalog.reweight("bandit", 1, (0.0, 0.0))
    draft = await catalog.create(experiment("draft", kind=xpb.EXPERIMENT_TYPE_BANDIT), "alice")
    with pytest.raises(FailedPrecondition, match="status: re-weighting needs an experiment in RUNNING"):
        await catalog.reweight(draft.key, 1, (0.5, 0.5))


async def test_a_decision_ends_the_experiment(catalog: ExperimentCatalog) -> None:
    published: list[apb.AssignmentConfig] = []
    catalog.on_publish(published.append)
    running = await started(catalog, experiment("ab"))
    record = xpb.DecisionRecord(action=xpb.DECISION_ACTION_SHIP_TREATMENT, arm="arm1", reason="won", phase=1)
    with pytest.raises(Aborted, match="expected_version: the experiment is at version 2, not 1"):
        await catalog.decide("ab", 1, record, "dana")
    decided = await catalog.decide("ab", running.version, record, "dana")
    assert decided.status == xpb.EXPERIMENT_STATUS_DECIDED
    assert (decided.decision.arm, decided.decision.decided_by, decided.stop_reason) == ("arm1", "dana", "decided")
    assert decided.decision.decided_at.seconds > 0
    assert decided.phases[-1].HasField("ended_at")
    assert published[-1].experiments == []  # gateways stop assigning it
    assert (await catalog.audit("ab"))[-1].detail == "decided SHIP_TREATMENT arm arm1: won"
    with pytest.raises(FailedPrecondition, match="status: a decision needs an experiment in RUNNING or STOPPED"):
        await catalog.decide("ab", decided.version, record, "dana")
    draft = await catalog.create(experiment("draft"), "alice")
    with pytest.raises(FailedPrecondition):
        await catalog.decide("draft", draft.version, record, "dana")
    assert await catalog.get("nope") is None
