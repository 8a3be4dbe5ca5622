"""The fleet over mTLS both ways: a predictor registers with a manager that requires client certificates, and the
manager loads a version onto the predictor, which requires them too."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from fresco.api.models.v1 import fleet_pb2 as fpb
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as pb_grpc
from fresco.suite import ServiceProcess
from fresco.training import train_classifier
from model_manager.server import build_server
from model_manager.settings import ModelManagerSettings
from tests.certs import make_pki
from tests.model_manager.fleet_support import eventually, register_version

pytestmark = pytest.mark.integration


async def test_register_and_load_over_mtls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    serving = {"tls_cert_file": pki.server.cert, "tls_key_file": pki.server.key, "tls_client_ca_file": pki.ca}
    peers = {"peer_tls_ca_file": pki.ca, "peer_tls_cert_file": pki.client.cert, "peer_tls_key_file": pki.client.key}
    settings = ModelManagerSettings(
        data_dir=tmp_path / "manager", port=0, metrics_port=-1, heartbeat_interval_s=0.3, **serving, **peers
    )
    manager = build_server(settings)
    await manager.app.start()
    await manager.ready()
    assert manager.fleet is not None
    flags = [f"--{name.replace('_', '-')}" for name in (*serving, *peers)]
    files = [str(path) for path in (*serving.values(), *peers.values())]
    args = [
        "--model-repository", str(tmp_path / "empty"), "--port", "0", "--metrics-port", "-1",
        "--model-control-mode", "explicit", "--model-manager-address", manager.app.address,
        "--predictor-id", "secure", *[item for pair in zip(flags, files, strict=True) for item in pair],
    ]  # fmt: skip
    (tmp_path / "empty").mkdir()
    predictor = ServiceProcess("predictor", args)
    credentials = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(), pki.client.key.read_bytes(), pki.client.cert.read_bytes()
    )
    channel = grpc.aio.secure_channel(manager.app.address, credentials)
    try:
        await asyncio.to_thread(predictor.start)
        stub: pb_grpc.ModelManagerServiceAsyncStub = pb_grpc.ModelManagerServiceStub(channel)  # type: ignore[assignment]

        async def registered() -> bool:
            reply = await stub.ListPredictors(pb.ListPredictorsRequest())
            return [(p.predictor_id, p.state) for p in reply.predictors] == [("secure", fpb.PREDICTOR_STATE_READY)]

        await eventually(registered, what="the predictor registered over mTLS")
        model = train_classifier(tmp_path / "trained", "tls", 1)
        version = await register_version(stub, "tls", model.path.read_bytes())
        (endpoint,) = await manager.fleet.ensure_loaded("tls", version)
        assert endpoint.address == predictor.address
    finally:
        await asyncio.to_thread(predictor.stop)
        await channel.close()
        await manager.app.stop(grace=1.0)
