"""Bandit arms at real gateway processes: a unit keeps the first arm stored for it when the weights move to
another arm (a new allocation), in the gateway's SQLite store across a restart, and in Redis across gateways."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.api.gateway.v1 import gateway_pb2 as gpb
from fresco.experiments.evaluator import Evaluator
from fresco.servers import RedisServer
from fresco.servers.pytest_plugin import redis_server
from gateway.experiment_watch import save_config
from gateway.route_watch import save_table
from tests.experiments.test_gateway_arms import Gateway, start_gateway
from tests.integration import features_of
from tests.model_manager.gateway_world import (
    MODEL,
    Predictors,
    closed_port,
    metric,
    start_predictors,
    table,
    version,
)

__all__ = ["redis_server"]
pytestmark = pytest.mark.integration
FIRST = [f"early-{i}" for i in range(10)]
LATER = [f"late-{i}" for i in range(10)]


def bandit(weights: tuple[float, float], allocation: int, revision: int) -> apb.AssignmentConfig:
    arms = [
        xpb.Arm(name="a", weight=weights[0], model_version=1),
        xpb.Arm(name="b", weight=weights[1], model_version=2),
    ]
    experiment = apb.ExperimentConfig(
        key="bandit", version=1 + allocation, phase=1, type=xpb.EXPERIMENT_TYPE_BANDIT, model_name=MODEL,
        unit_type="user_id", salt="bandit", coverage=1.0, arms=arms, allocation=allocation,
    )  # fmt: skip
    return apb.AssignmentConfig(revision=revision, experiments=[experiment])


def prepare(state: Path, predictors: Predictors, config: apb.AssignmentConfig) -> None:
    live = predictors.endpoint
    save_table(state, table(1, version("1", 100, live), version("2", 0, live)))
    save_config(state, Evaluator(config))


@pytest.fixture(scope="module")
def predictors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Predictors]:
    yield from start_predictors(tmp_path_factory.mktemp("bandit-models"))


async def arms(gateway: Gateway, predictors: Predictors, units: list[str]) -> list[tuple[str, str, int]]:
    """(arm, version that answered, exposed) per unit."""
    out = []
    for unit in units:
        request = gpb.PredictRequest(
            model=MODEL, features=features_of(predictors.rows()[0]), unit_ids={"user_id": unit}
        )
        answer = await gateway.predict(request)
        out.append((answer.experiment_arm, answer.model_version, int(answer.experiments[0].exposed)))
    return out


async def test_units_keep_their_first_arm_in_the_state_dir_across_a_restart(
    predictors: Predictors, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    prepare(state, predictors, bandit((1.0, 0.0), 0, 1))
    gateway = Gateway(await start_gateway(state))
    try:
        assert await arms(gateway, predictors, FIRST) == [("a", "1", 1)] * len(FIRST)
    finally:
        await gateway.close()
    # Re-weighted towards "b" (a new allocation), and the gateway restarted: the early units stay on "a".
    save_config(state, Evaluator(bandit((0.0, 1.0), 1, 2)))
    gateway = Gateway(await start_gateway(state))
    try:
        assert await arms(gateway, predictors, FIRST) == [("a", "1", 1)] * len(FIRST)
        assert await arms(gateway, predictors, LATER) == [("b", "2", 1)] * len(LATER)
    finally:
        await gateway.close()


async def test_units_keep_their_first_arm_across_gateways_sharing_redis(
    predictors: Predictors, redis_server: RedisServer, tmp_path: Path
) -> None:
    prepare(tmp_path / "one", predictors, bandit((1.0, 0.0), 0, 1))
    prepare(tmp_path / "two", predictors, bandit((0.0, 1.0), 1, 2))
    flags = ("--sticky-redis-url", redis_server.url)
    one = Gateway(await start_gateway(tmp_path / "one", *flags))
    two = Gateway(await start_gateway(tmp_path / "two", *flags))
    try:
        assert await arms(one, predictors, FIRST) == [("a", "1", 1)] * len(FIRST)
        # The other gateway weighs "b" only, yet the units "one" placed keep "a".
        assert await arms(two, predictors, FIRST) == [("a", "1", 1)] * len(FIRST)
        assert await arms(two, predictors, LATER) == [("b", "2", 1)] * len(LATER)
        assert await arms(one, predictors, LATER) == [("b", "2", 1)] * len(LATER)
    finally:
        await one.close()
        await two.close()
    assert not (tmp_path / "one" / "sticky.db").exists(), "with Redis, no local store"


async def test_a_bandit_request_is_served_outside_the_bandit_while_redis_is_down(
    predictors: Predictors, tmp_path: Path
) -> None:
    prepare(tmp_path / "state", predictors, bandit((0.0, 1.0), 0, 1))
    down = f"redis://{closed_port().address}/0"  # nothing listens there
    gateway = Gateway(await start_gateway(tmp_path / "state", "--sticky-redis-url", down))
    try:
        request = gpb.PredictRequest(model=MODEL, features=features_of(predictors.rows()[0]), unit_ids={"user_id": "u"})
        answer = await gateway.predict(request)
        assert (answer.model_version, answer.experiment_arm, list(answer.experiments)) == ("1", "", [])
        assert metric(gateway.process, "fresco_gateway_experiment_unsettled_total") == 1
    finally:
        await gateway.close()
