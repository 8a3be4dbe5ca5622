"""The plaintext health port (`--health-port`) Kubernetes' native gRPC probes use when the service
speaks only (m)TLS: it answers grpc.health.v1 with the service's own status, and nothing else."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic_settings import SettingsConfigDict

from chassis.server import ServiceApp
from chassis.settings import ServiceSettings
from tests.certs import make_pki

SERVICE = "fresco.unittest.v1.Probed"


class ProbedSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FRESCO_UNITPROBED_")


async def _status(address: str, service: str = "") -> Any:
    async with aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            answer = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        except aio.AioRpcError as err:
            return err.code()
        return answer.status


async def test_health_port_answers_in_plaintext_beside_an_mtls_port(tmp_path: Any) -> None:
    pki = make_pki(tmp_path)
    settings = ProbedSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        health_port=0,
        tls_cert_file=pki.server.cert,
        tls_key_file=pki.server.key,
        tls_client_ca_file=pki.ca,
    )
    app = ServiceApp("probed", settings, [SERVICE])
    await app.start()
    health_address = f"127.0.0.1:{app.health_port}"
    try:
        assert app.health_port not in (0, app.port)
        # The main port takes no plaintext, not even health.
        assert await _status(app.address) is grpc.StatusCode.UNAVAILABLE
        assert await _status(health_address) == health_pb2.HealthCheckResponse.NOT_SERVING
        await app.set_serving(True)
        assert await _status(health_address) == health_pb2.HealthCheckResponse.SERVING
        assert await _status(health_address, SERVICE) == health_pb2.HealthCheckResponse.SERVING
        # Only health is served there.
        async with aio.insecure_channel(health_address) as channel:
            with pytest.raises(aio.AioRpcError) as refused:
                await channel.unary_unary(f"/{SERVICE}/Anything")(b"", timeout=10)
        assert refused.value.code() is grpc.StatusCode.UNIMPLEMENTED
    finally:
        await app.stop(grace=1)
    assert await _status(health_address) is grpc.StatusCode.UNAVAILABLE


async def test_health_port_is_off_by_default() -> None:
    app = ServiceApp("probed", ProbedSettings(host="127.0.0.1", port=0, metrics_port=-1), [SERVICE])
    await app.start()
    try:
        assert app.health_server is None
        assert app.health_port == 0
    finally:
        await app.stop(grace=1)
