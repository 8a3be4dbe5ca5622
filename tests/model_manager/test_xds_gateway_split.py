"""The gateway (route table from WatchRoutes) and gRPC's proxyless xDS client (the same weights from
the ADS server) split traffic alike: both give the canary its weight's share of the calls."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from grpc import aio

from fresco.api.gateway.v1 import gateway_pb2 as gpb
from fresco.api.gateway.v1 import gateway_pb2_grpc as gpb_grpc
from fresco.suite import ServiceProcess
from model_manager.routes import Endpoint, ModelRoute, RouteTable, VersionRoute
from model_manager.xds import AdsServer
from tests.model_manager.gateway_world import (
    FAST_WINDOWS,
    MODEL,
    PREDICTOR_MODEL,
    Predictors,
    request,
    start_gateway,
    start_predictors,
)
from tests.model_manager.route_manager import RouteManager
from tests.model_manager.test_xds_proxyless import ROOT, ProxylessClient, ask

pytestmark = pytest.mark.integration

SEED = "same-seed"
BASELINE, CANARY = 7500, 2500  # the canary ("2") gets p = 0.25 of the traffic
P = CANARY / (BASELINE + CANARY)
# Each count below is binomial. A bound of 6.5 standard deviations fails by chance with probability
# about 1e-10 per comparison: practically never, yet a split that ignored the weights (or inverted
# them) lands tens of deviations away and fails.
SIGMAS = 6.5


def share_bounds(n: int) -> tuple[float, float]:
    """The canary share's 6.5-sigma interval for n independent draws at p = P."""
    half = SIGMAS * math.sqrt(P * (1 - P) / n)
    return P - half, P + half


def split(versions: tuple[VersionRoute, ...]) -> RouteTable:
    return RouteTable(1, (ModelRoute(MODEL, versions, SEED),), FAST_WINDOWS)


@pytest.fixture(scope="module")
def version_servers() -> Iterator[dict[str, Endpoint]]:
    """Servers v1 and v2 answering with their label, for the proxyless client."""
    started: list[ServiceProcess] = []
    try:
        for label in ("v1", "v2"):
            process = ServiceProcess("tests.model_manager.xds_version_server", [label], env={"PYTHONPATH": str(ROOT)})
            started.append(process)
            process.start()
            process.wait_healthy()
        yield {label: Endpoint.parse(p.address) for label, p in zip(("v1", "v2"), started, strict=True)}
    finally:
        for process in started:
            process.stop()


@pytest.fixture(scope="module")
def predictors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Predictors]:
    yield from start_predictors(tmp_path_factory.mktemp("split-models"))


@pytest.fixture
async def ads() -> AsyncIterator[AdsServer]:
    server = AdsServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_gateway_and_proxyless_client_split_alike(
    ads: AdsServer, version_servers: dict[str, Endpoint], predictors: Predictors, tmp_path: Path
) -> None:
    # The proxyless client: versions "1" and "2" are the labelled servers v1 and v2.
    ads.update(
        split(
            (
                VersionRoute("1", BASELINE, (version_servers["v1"],)),
                VersionRoute("2", CANARY, (version_servers["v2"],)),
            )
        )
    )
    client = ProxylessClient(ads.port, tmp_path / "xds_client.log")
    manager = await RouteManager().start()
    process = await start_gateway(manager.address, tmp_path / "state")
    try:
        assert (await ask(client, "until v1"))["reached"]
        assert (await ask(client, "until v2"))["reached"]
        xds_calls = 1000
        xds_counts = (await ask(client, f"count {xds_calls}"))["counts"]
        assert sum(xds_counts.values()) == xds_calls
        xds_share = xds_counts.get("v2", 0) / xds_calls

        # The gateway: the same weights and seed over the predictor serving versions 1 and 2.
        live = predictors.endpoint
        manager.hub.publish(
            split(
                (
                    VersionRoute("1", BASELINE, (live,), PREDICTOR_MODEL),
                    VersionRoute("2", CANARY, (live,), PREDICTOR_MODEL),
                )
            )
        )
        assert await manager.hub.wait_applied(MODEL, 1, 60.0)
        rows = predictors.rows()
        async with aio.insecure_channel(process.address) as channel:
            stub = gpb_grpc.GatewayServiceStub(channel)

            async def shares(unit_ids: list[str]) -> float:
                batch = gpb.PredictBatchRequest(
                    requests=[request(rows[i % len(rows)], unit) for i, unit in enumerate(unit_ids)]
                )
                answer = await stub.PredictBatch(batch, timeout=120)
                counts = Counter(r.model_version for r in answer.responses)
                assert set(counts) <= {"1", "2"}
                return counts["2"] / len(unit_ids)

            sticky_n, random_n = 2000, 1000
            sticky_share = await shares([f"user-{i}" for i in range(sticky_n)])  # hashed units
            random_share = await shares([""] * random_n)  # no unit id: a random draw each
    finally:
        await asyncio.to_thread(process.stop)
        await manager.stop()
        await asyncio.to_thread(client.close)

    for name, share, n in (
        ("xds", xds_share, xds_calls),
        ("sticky", sticky_share, sticky_n),
        ("random", random_share, random_n),
    ):
        low, high = share_bounds(n)
        assert low <= share <= high, f"{name}: canary share {share:.3f} outside [{low:.3f}, {high:.3f}] for p={P}"
    # The two random splits against each other: the difference of two shares has variance
    # p(1-p)(1/n1 + 1/n2); 6.5 standard deviations of it bound |difference|.
    bound = SIGMAS * math.sqrt(P * (1 - P) * (1 / xds_calls + 1 / random_n))
    assert abs(xds_share - random_share) <= bound, (xds_share, random_share, bound)
