"""Envoy, as deployed, subscribes to the model manager's ADS without a token while auth is on: the
route table is a read there, as WatchRoutes is for gateways (not an unlisted method's admin); a token
that does not verify is still refused."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from chassis.auth import Role, new_token, token_line
from fresco.suite import ServiceProcess
from model_manager.envoy_resources import CLUSTER

pytestmark = pytest.mark.integration


def subscribe(address: str, token: str | None) -> grpc.StatusCode:
    """One state-of-the-world CDS request as Envoy sends it, then the end of the request stream."""
    request = discovery_pb2.DiscoveryRequest(type_url=CLUSTER)
    request.node.id = "fresco-envoy-0"
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(address) as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        try:
            for _ in stub.StreamAggregatedResources(iter([request]), timeout=10, metadata=metadata):
                pass
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def test_envoy_subscribes_without_a_token_while_auth_is_on(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(token_line("deployer", Role.DEPLOYER, new_token()) + "\n")
    manager = ServiceProcess(
        "model_manager",
        args=["--data-dir", str(tmp_path / "data"), "--port", "0", "--metrics-port", "-1"],
        env={"FRESCO_MODEL_MANAGER_AUTH_TOKENS_FILE": str(tokens)},
    ).start()
    try:
        manager.wait_healthy()
        assert subscribe(manager.address, None) is grpc.StatusCode.OK
        assert subscribe(manager.address, "not-a-token") is grpc.StatusCode.UNAUTHENTICATED
    finally:
        assert manager.stop() == 0, manager.output()
