"""Assign for bandits: every unit keeps the first arm it was given, through re-weightings (the servicer over a real
catalog and a real SQLite sticky store) and through restarts of the service process."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from chassis.errors import FailedPrecondition
from experiment_service.catalog import ExperimentCatalog
from experiment_service.config_hub import ConfigHub
from experiment_service.domain import Domain
from experiment_service.service import ExperimentServicer
from experiment_service.store import ExperimentStore
from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.api.experiments.v1 import experiment_service_pb2 as pb
from fresco.experiments.sticky import SqliteStickyArms
from model_manager.tables import sqlite_url
from tests.experiment_service.service_support import create_and_start, experiment, running, stub_for

UNITS = [apb.AssignmentUnit(unit_ids={"user_id": f"u{i}"}) for i in range(400)]
NO_CONTEXT: Any = None  # Assign reads nothing from its call context


def bandit(key: str = "bandit") -> xpb.Experiment:
    return experiment(key, (1.0, 1.0), kind=xpb.EXPERIMENT_TYPE_BANDIT)


def arms(response: pb.AssignResponse) -> list[tuple[str, int]]:
    return [(u.assignments[0].arm_name, u.assignments[0].allocation) for u in response.units]


@pytest.fixture
async def servicer(tmp_path: Path) -> AsyncIterator[ExperimentServicer]:
    store = ExperimentStore.open(sqlite_url(tmp_path / "experiments.db"))
    catalog = ExperimentCatalog(store)
    await catalog.load()
    sticky = SqliteStickyArms(tmp_path / "sticky.db")
    servicer = ExperimentServicer()  # type: ignore[abstract]
    servicer.domain = Domain(catalog, ConfigHub(), sticky=sticky)
    yield servicer
    await sticky.close()
    store.close()


async def test_reweighting_moves_no_unit(servicer: ExperimentServicer) -> None:
    assert servicer.domain is not None
    catalog = servicer.domain.catalog
    created = await catalog.create(bandit(), "alice")
    await catalog.start(created.key, created.version, "alice")
    first = arms(await servicer.Assign(pb.AssignRequest(units=UNITS[:200]), NO_CONTEXT))
    assert {allocation for _, allocation in first} == {0}
    assert set(Counter(arm for arm, _ in first)) == {"arm0", "arm1"}

    await catalog.reweight("bandit", 1, (0.02, 0.98))
    second = arms(await servicer.Assign(pb.AssignRequest(units=UNITS), NO_CONTEXT))
    assert second[:200] == first  # the units seen before keep their arm and their allocation
    newcomers = Counter(second[200:])
    assert set(newcomers) <= {("arm0", 1), ("arm1", 1)}
    assert newcomers[("arm1", 1)] > 150  # new units follow the new weights (98% by hash, of 200)


async def test_without_a_sticky_store_bandits_are_refused(servicer: ExperimentServicer) -> None:
    assert servicer.domain is not None
    catalog = servicer.domain.catalog
    created = await catalog.create(bandit(), "alice")
    await catalog.start(created.key, created.version, "alice")
    servicer.domain = Domain(catalog, servicer.domain.hub)
    with pytest.raises(FailedPrecondition, match="bandit experiments need the sticky-arm store"):
        await servicer.Assign(pb.AssignRequest(units=UNITS[:3]), NO_CONTEXT)


@pytest.mark.integration
def test_bandit_arms_survive_restarts(tmp_path: Path) -> None:
    with running(tmp_path) as process, stub_for(process) as stub:
        create_and_start(stub, bandit())
        before = stub.Assign(pb.AssignRequest(units=UNITS))
    assert (tmp_path / "sticky.db").exists()
    with running(tmp_path) as process, stub_for(process) as stub:
        assert stub.Assign(pb.AssignRequest(units=UNITS)) == before
