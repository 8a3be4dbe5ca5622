"""The production predictor as its manifest starts it (the rendered overlay's variables, `--workers 2`,
TLS, tokens), moved onto loopback: kubelet's native gRPC probe, which cannot speak TLS, gets SERVING
from the plaintext health port on every connection (both workers share it), while the gRPC port
refuses plaintext and serves TLS clients."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chassis.auth import Role, new_token, token_line
from fresco.credentials import ClientSecurity
from fresco.servers._process import free_ports
from fresco.suite import ServiceProcess
from tests.certs import make_pki
from tests.deploy.rendering import DEPLOY, container_env, fresco_containers, validate

pytestmark = pytest.mark.integration


def check(channel: grpc.Channel) -> int | grpc.StatusCode:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.RpcError as err:
        return err.code()
    return int(reply.status)


def probe(address: str) -> int | grpc.StatusCode:
    """What kubelet's gRPC probe does: a fresh plaintext connection, one Check of the server's health."""
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        return check(channel)


def test_production_predictor_answers_probes_on_its_plaintext_health_port(
    validator: Path, settings_file: Path, tmp_path: Path
) -> None:
    code, output = validate(validator, settings_file, DEPLOY, "production", out=tmp_path)
    assert code == 0, output
    [container] = [c for component, c in fresco_containers(tmp_path / "production.yaml") if component == "predictor"]
    env = container_env(container, tmp_path / "files")

    # The Secrets' files: real certificates and tokens where the manifest mounts them.
    pki = make_pki(tmp_path / "pki")
    shutil.copy(pki.server.cert, env["FRESCO_PREDICTOR_TLS_CERT_FILE"])
    shutil.copy(pki.server.key, env["FRESCO_PREDICTOR_TLS_KEY_FILE"])
    shutil.copy(pki.ca, env["FRESCO_PREDICTOR_PEER_TLS_CA_FILE"])
    token = new_token()
    Path(env["FRESCO_PREDICTOR_AUTH_TOKENS_FILE"]).write_text(token_line("predictor", Role.DEPLOYER, token) + "\n")
    Path(env["FRESCO_PREDICTOR_PEER_TOKEN_FILE"]).write_text(token + "\n")

    # Loopback instead of a pod: free ports, writable directories, no collector, no manager to join.
    grpc_port, health_port, metrics_port = free_ports(3)
    assert env["FRESCO_PREDICTOR_HEALTH_PORT"] == "50052"
    assert env["FRESCO_PREDICTOR_WORKERS"] == "2"
    env |= {
        "FRESCO_PREDICTOR_HOST": "127.0.0.1",
        "FRESCO_PREDICTOR_PORT": str(grpc_port),
        "FRESCO_PREDICTOR_HEALTH_PORT": str(health_port),
        "FRESCO_PREDICTOR_METRICS_PORT": str(metrics_port),
        "FRESCO_PREDICTOR_TRACING_EXPORTER": "none",
        "FRESCO_PREDICTOR_MODEL_MANAGER_ADDRESS": "",
        "FRESCO_PREDICTOR_ADVERTISE_ADDRESS": "",
        "FRESCO_PREDICTOR_MODEL_REPOSITORY": str(tmp_path / "models"),
        "FRESCO_PREDICTOR_SHARED_WEIGHTS_DIR": str(tmp_path / "cache" / "shared-weights"),
        "FRESCO_PREDICTOR_TRT_ENGINE_CACHE_DIR": str(tmp_path / "cache" / "trt-engines"),
        "HOME": str(tmp_path),
    }
    (tmp_path / "models").mkdir()
    predictor = ServiceProcess("predictor", env=env).start()
    try:
        assert predictor.workers == 2
        health = f"127.0.0.1:{health_port}"
        deadline = time.monotonic() + 60
        while probe(health) != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, f"the health port never said SERVING:\n{predictor.output()}"
            time.sleep(0.1)
        # Connections spread over both workers: each answers.
        assert {probe(health) for _ in range(20)} == {health_pb2.HealthCheckResponse.SERVING}
        # The gRPC port speaks only TLS.
        assert probe(predictor.address) is grpc.StatusCode.UNAVAILABLE
        with ClientSecurity(ca_file=pki.ca).channel(predictor.address) as secure:
            assert check(secure) == health_pb2.HealthCheckResponse.SERVING
    finally:
        assert predictor.stop() == 0, predictor.output()
