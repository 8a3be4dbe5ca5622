"""The bandit loop in the real service process: exposures and outcomes flow in, the loop re-weights towards the
better arm (a new allocation of the same phase, audited as "bandit", published), every arm keeps its floor, and
units assigned before keep their arm; on SQLite and on Redis (statistics and sticky arms)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from google.protobuf.duration_pb2 import Duration

from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.api.experiments.v1 import experiment_service_pb2 as pb
from fresco.api.experiments.v1 import experiment_service_pb2_grpc as pb_grpc
from fresco.experiments.exposure import exposure_id
from fresco.servers import RedisServer
from fresco.servers.pytest_plugin import redis_server
from tests.experiment_service.service_support import create_and_start, experiment, running, stub_for

__all__ = ["redis_server"]
pytestmark = pytest.mark.integration

KEY = "bandit-checkout"
FLOOR = 0.1
UNITS = [apb.AssignmentUnit(unit_ids={"user_id": f"u{i}"}) for i in range(400)]
WAIT_S = 60.0  # a generous bound for the loop's first round on a loaded machine


def bandit() -> xpb.Experiment:
    settings = xpb.BanditSettings(update_interval=Duration(seconds=1), min_units_per_arm=30, min_arm_share=FLOOR)
    return experiment(KEY, (1.0, 1.0), kind=xpb.EXPERIMENT_TYPE_BANDIT, bandit=settings)


def arms_of(response: pb.AssignResponse) -> list[tuple[str, int]]:
    return [(u.assignments[0].arm_name, u.assignments[0].allocation) for u in response.units]


def feed(stub: pb_grpc.ExperimentServiceStub, assigned: list[tuple[str, int]]) -> None:
    """Every unit exposed to its arm; arm1 converts one unit in two, arm0 one in ten."""
    exposures, outcomes = [], []
    for i, (arm, allocation) in enumerate(assigned):
        uid = f"u{i}"
        exposures.append(
            apb.Exposure(
                exposure_id=exposure_id(KEY, 1, "user_id", uid, arm), experiment_key=KEY, phase=1,
                unit_type="user_id", unit_id=uid, arm_name=arm, allocation=allocation,
            )
        )  # fmt: skip
        if i % (2 if arm == "arm1" else 10) == 0:
            outcomes.append(
                apb.Outcome(outcome_id=f"o{i}", experiment_key=KEY, unit_type="user_id", unit_id=uid,
                            event="conversion", value=1.0)
            )  # fmt: skip
    assert stub.LogExposures(pb.LogExposuresRequest(exposures=exposures)).accepted == len(exposures)
    (answer,) = stub.LogOutcomes(iter([pb.LogOutcomesRequest(batch_id="b1", outcomes=outcomes)]))
    assert answer.accepted == len(outcomes)


def reweighted(stub: pb_grpc.ExperimentServiceStub, version: int) -> xpb.Experiment:
    deadline = time.monotonic() + WAIT_S
    while True:
        e = stub.GetExperiment(pb.GetExperimentRequest(key=KEY)).experiment
        if e.version > version:
            return e
        assert time.monotonic() < deadline, "the bandit loop did not re-weight in time"
        time.sleep(0.1)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_the_loop_reweights_towards_the_better_arm(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    extra: list[str] = []
    if backend == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        extra = ["--redis-url", server.url, "--stats-redis-prefix", f"t:{tmp_path.name}:"]
    with running(tmp_path, *extra) as process, stub_for(process) as stub:
        started = create_and_start(stub, bandit())
        first = arms_of(stub.Assign(pb.AssignRequest(units=UNITS[:120])))
        assert {allocation for _, allocation in first} == {0}
        feed(stub, first)
        after = reweighted(stub, started.version)
        weights = [a.weight for a in after.arms]
        assert weights[1] > 0.5 > weights[0] >= FLOOR - 1e-9
        assert sum(weights) == pytest.approx(1.0)
        assert [(p.number, list(p.weights)) for p in after.phases] == [(1, [1.0, 1.0])]  # the same phase
        entry = stub.ListAuditEntries(pb.ListAuditEntriesRequest(key=KEY)).entries[started.version]
        assert (entry.action, entry.identity) == ("reweight", "bandit")
        again = arms_of(stub.Assign(pb.AssignRequest(units=UNITS)))
    assert again[:120] == first  # sticky: re-weighting moved no one
    assert {allocation for _, allocation in again[120:]} - {0} != set()  # newcomers under a new allocation
