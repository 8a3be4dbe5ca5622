"""gRPC's own proxyless xDS client, fed by the ADS server, routing real calls to two real servers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fresco.suite import ServiceProcess
from model_manager.envoy_resources import LISTENER, XdsSnapshot, snapshot
from model_manager.routes import Endpoint, ModelRoute, RouteTable, Shadow, VersionRoute
from model_manager.xds import AdsServer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

MODEL = "fraud"
NODE = "proxyless-test"


def table(revision: int, endpoints: dict[str, Endpoint], v1: int, v2: int, shadow: Shadow | None = None) -> RouteTable:
    versions = (VersionRoute("v1", v1, (endpoints["v1"],)), VersionRoute("v2", v2, (endpoints["v2"],)))
    return RouteTable(revision, (ModelRoute(MODEL, versions, "seed-1", shadow=shadow),))


class ProxylessClient:
    """The client process: one command a line in, one JSON answer a line out."""

    def __init__(self, ads_port: int, log: Path) -> None:
        bootstrap = {
            "xds_servers": [
                {
                    "server_uri": f"127.0.0.1:{ads_port}",
                    "channel_creds": [{"type": "insecure"}],
                    "server_features": ["xds_v3"],
                }
            ],
            "node": {"id": NODE},
        }
        env = {**os.environ, "PYTHONPATH": str(ROOT), "GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps(bootstrap)}
        env.pop("GRPC_XDS_BOOTSTRAP", None)
        self.log = log
        self._stderr = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.model_manager.xds_client", MODEL],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
        )

    def ask(self, command: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"the client exited ({self.process.poll()}):\n{self.log.read_text()}"
        reply: dict[str, Any] = json.loads(line)
        assert "error" not in reply, f"{command}: {reply['error']}\n{self.log.read_text()}"
        return reply

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._stderr.close()


@pytest.fixture(scope="module")
def version_servers() -> Iterator[dict[str, Endpoint]]:
    """`v1` and `v2`: one real server process each, answering with its label; their endpoints."""
    started: list[ServiceProcess] = []
    endpoints: dict[str, Endpoint] = {}
    try:
        for label in ("v1", "v2"):
            process = ServiceProcess("tests.model_manager.xds_version_server", [label], env={"PYTHONPATH": str(ROOT)})
            started.append(process)
            process.start()
            process.wait_healthy()
            endpoints[label] = Endpoint.parse(process.address)
        yield endpoints
    finally:
        for process in started:
            process.stop()


@pytest.fixture
async def ads() -> AsyncIterator[AdsServer]:
    server = AdsServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def client(ads: AdsServer, tmp_path: Path) -> Iterator[ProxylessClient]:
    running = ProxylessClient(ads.port, tmp_path / "xds_client.log")
    try:
        yield running
    finally:
        running.close()


async def ask(client: ProxylessClient, command: str) -> dict[str, Any]:
    # The ADS server runs on this event loop: the client's blocking pipe is read off it.
    return await asyncio.to_thread(client.ask, command)


async def wait_for(condition: Any, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_proxyless_client_follows_weight_changes(ads, client, version_servers) -> None:
    ads.update(table(1, version_servers, 100, 0))
    assert await ask(client, "count 40") == {"counts": {"v1": 40}}

    ads.update(table(2, version_servers, 0, 100))
    assert (await ask(client, "until v2"))["reached"]
    # Once the client took the new routes, every call goes to v2.
    assert await ask(client, "count 40") == {"counts": {"v2": 40}}

    ads.update(table(3, version_servers, 25, 75, shadow=Shadow("v2", 0.1)))
    assert (await ask(client, "until v1"))["reached"]
    counts = (await ask(client, "count 400"))["counts"]
    # gRPC draws each call's cluster at random: 100 ± 8.7 expected for v1; ±50 is over 5 sigma.
    assert counts.keys() == {"v1", "v2"}
    assert counts["v1"] + counts["v2"] == 400
    assert 50 <= counts["v1"] <= 150, counts

    [status] = ads.service.clients()
    assert status.node_id == NODE
    assert status.route_revision == 3
    assert status.synced_revision == 3
    assert status.rejected == {}
    assert ads.service.nacks() == []


def without_router(resources: XdsSnapshot, revision: int) -> XdsSnapshot:
    """The same resources under a new revision, the listener's HTTP filters (the router) removed."""
    from envoy.config.listener.v3 import listener_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2

    broken = {}
    for name, packed in resources.named(LISTENER).items():
        listener = listener_pb2.Listener()
        packed.Unpack(listener)
        manager = http_connection_manager_pb2.HttpConnectionManager()
        listener.api_listener.api_listener.Unpack(manager)
        del manager.http_filters[:]
        listener.api_listener.api_listener.Pack(manager)
        broken[name] = type(packed)()
        broken[name].Pack(listener)
    return XdsSnapshot(revision, {**resources.resources, LISTENER: broken}, resources.route_clusters)


async def test_proxyless_client_nack_keeps_last_good_config(ads, client, version_servers) -> None:
    ads.update(table(1, version_servers, 100, 0))
    assert await ask(client, "count 10") == {"counts": {"v1": 10}}

    ads.service.publish(without_router(snapshot(table(2, version_servers, 0, 100)), 2))
    await wait_for(lambda: ads.service.nacks(), "the client's NACK")
    [nack] = ads.service.nacks()
    assert (nack.node_id, nack.kind, nack.rejected_version, nack.kept_version) == (NODE, "LDS", "2", "1")
    assert "router" in nack.message.lower() or "filter" in nack.message.lower(), nack.message
    [status] = ads.service.clients()
    assert status.rejected[LISTENER] == nack
    assert status.synced_revision == 1
    # The rejected listener came with no route change the client could act on: it keeps v1.
    assert await ask(client, "count 20") == {"counts": {"v1": 20}}

    ads.update(table(3, version_servers, 0, 100))
    assert (await ask(client, "until v2"))["reached"]
    assert await ask(client, "count 20") == {"counts": {"v2": 20}}
    [status] = ads.service.clients()
    assert status.rejected == {}
    assert status.route_revision == 3


def ads_streams_in_flight(metrics_url: str) -> float:
    """The ADS streams a service is handling now, from its Prometheus endpoint."""
    with urllib.request.urlopen(metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "fresco_rpc_in_flight" and sample.labels["method"].endswith("/StreamAggregatedResources")
    )


def test_a_stopping_manager_ends_its_xds_streams_instead_of_waiting_out_its_grace_period(tmp_path: Path) -> None:
    grace_s = 60.0
    manager = ServiceProcess(
        "model_manager",
        ["--data-dir", str(tmp_path / "manager"), "--port", "0", "--grace-period-s", str(grace_s)],
        log_path=tmp_path / "model_manager.log",
    )
    client: ProxylessClient | None = None
    try:
        manager.start()
        manager.wait_healthy()
        client = ProxylessClient(int(manager.address.rsplit(":", 1)[1]), tmp_path / "xds_client.log")
        assert client.ask("connect") == {"connecting": True}
        deadline = time.monotonic() + 60.0
        while ads_streams_in_flight(manager.metrics_url) < 1:
            assert time.monotonic() < deadline, f"no ADS stream from the client:\n{client.log.read_text()}"
            time.sleep(0.05)
        started = time.monotonic()
        code = manager.stop(grace_s=grace_s + 60.0)
        took = time.monotonic() - started
    finally:
        if client is not None:
            client.close()
        manager.stop()
    assert code == 0, manager.output()[-3000:]
    # A generous bound, not a speed claim: a stream left open would hold the stop for the whole grace period.
    assert took < grace_s, (took, manager.output()[-3000:])
    assert re.search(r"ending \d+ xDS streams", manager.output()), manager.output()[-3000:]
