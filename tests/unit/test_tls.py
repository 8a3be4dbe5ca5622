"""TLS and mTLS by settings, in process: a real grpc.aio server with certificates made by the test,
reached by clients with and without the CA and a client certificate, and by another service's peer
channel carrying its own token."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict

from chassis.auth import Role, current_identity, new_token, token_line
from chassis.errors import InvalidArgument
from chassis.server import ServiceApp
from chassis.settings import ServiceSettings
from fresco.credentials import ClientSecurity
from tests.certs import Pki, make_pki

SERVICE = "fresco.unittest.v1.Secure"
WHO = f"/{SERVICE}/Who"


class SecureSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FRESCO_UNITSECURE_")


def _settings(**overrides: Any) -> SecureSettings:
    values: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": -1}
    return SecureSettings(**{**values, **overrides})


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def _who(request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
    identity = current_identity()
    return b"anonymous" if identity is None else identity.subject.encode()


async def _serve(settings: SecureSettings, roles: dict[str, Role | None] | None = None) -> ServiceApp:
    app = ServiceApp("secure", settings, [SERVICE], method_roles=roles)
    handlers = {"Who": grpc.unary_unary_rpc_method_handler(_who)}
    app.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    await app.start()
    return app


async def _call(channel: aio.Channel) -> bytes | grpc.StatusCode:
    try:
        answer: bytes = await channel.unary_unary(WHO)(b"", timeout=10)
    except aio.AioRpcError as err:
        return err.code()
    return answer


async def test_tls_server_serves_clients_that_trust_its_ca_only(pki: Pki) -> None:
    app = await _serve(_settings(tls_cert_file=pki.server.cert, tls_key_file=pki.server.key))
    try:
        assert app.tls
        async with ClientSecurity(ca_file=pki.ca).aio_channel(app.address) as channel:
            assert await _call(channel) == b"anonymous"
        async with aio.insecure_channel(app.address) as plaintext:
            assert await _call(plaintext) is grpc.StatusCode.UNAVAILABLE
        async with ClientSecurity(ca_file=pki.other_ca).aio_channel(app.address) as untrusting:
            assert await _call(untrusting) is grpc.StatusCode.UNAVAILABLE
    finally:
        await app.stop(grace=1)


async def test_mtls_server_refuses_clients_without_a_certificate(pki: Pki) -> None:
    settings = _settings(tls_cert_file=pki.server.cert, tls_key_file=pki.server.key, tls_client_ca_file=pki.ca)
    app = await _serve(settings)
    try:
        async with ClientSecurity(ca_file=pki.ca).aio_channel(app.address) as no_cert:
            assert await _call(no_cert) is grpc.StatusCode.UNAVAILABLE
        with_cert = ClientSecurity(ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.client.key)
        async with with_cert.aio_channel(app.address) as channel:
            assert await _call(channel) == b"anonymous"
    finally:
        await app.stop(grace=1)


async def test_peer_channel_speaks_mtls_and_presents_the_service_token(pki: Pki, tmp_path: Path) -> None:
    token = new_token()
    tokens = tmp_path / "tokens"
    tokens.write_text(token_line("gateway", Role.VIEWER, token) + "\n")
    token_file = tmp_path / "gateway.token"
    token_file.write_text(token + "\n")
    server = await _serve(
        _settings(
            tls_cert_file=pki.server.cert,
            tls_key_file=pki.server.key,
            tls_client_ca_file=pki.ca,
            auth_tokens_file=tokens,
            auth_require_for_reads=True,
        ),
        roles={WHO: None},
    )
    caller = ServiceApp(
        "caller",
        _settings(
            peer_tls_ca_file=pki.ca,
            peer_tls_cert_file=pki.client.cert,
            peer_tls_key_file=pki.client.key,
            peer_token_file=token_file,
        ),
        [],
    )
    try:
        channel = caller.client_channel(server.address)
        assert await _call(channel) == b"gateway"
        await channel.close()
        # The same call without the token: refused, so the answer above came from the token.
        bare = ClientSecurity(ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.client.key)
        async with bare.aio_channel(server.address) as anonymous:
            assert await _call(anonymous) is grpc.StatusCode.UNAUTHENTICATED
    finally:
        await caller.stop(grace=1)
        await server.stop(grace=1)


def test_security_settings_must_agree(pki: Pki) -> None:
    with pytest.raises(ValidationError, match="tls_cert_file and tls_key_file go together"):
        _settings(tls_cert_file=pki.server.cert)
    with pytest.raises(ValidationError, match=re.escape("tls_client_ca_file (mTLS) needs tls_cert_file")):
        _settings(tls_client_ca_file=pki.ca)
    with pytest.raises(ValidationError, match="peer_tls_cert_file needs peer_tls_ca_file"):
        _settings(peer_tls_cert_file=pki.client.cert, peer_tls_key_file=pki.client.key)
    with pytest.raises(ValidationError, match="peer_tls_cert_file and peer_tls_key_file go together"):
        _settings(peer_tls_ca_file=pki.ca, peer_tls_cert_file=pki.client.cert)


def test_client_security_reads_token_and_tls_files_from_the_environment(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("  abc  \n")
    monkeypatch.setenv("FRESCO_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("FRESCO_TLS_CA_FILE", str(pki.ca))
    monkeypatch.setenv("FRESCO_TLS_SERVER_NAME", "localhost")
    security = ClientSecurity.from_env()
    assert security.metadata() == (("authorization", "Bearer abc"),)
    assert security.tls
    assert security.options() == [("grpc.ssl_target_name_override", "localhost")]
    token_file.write_text("\n")
    with pytest.raises(ValueError, match="expected a bearer token, the file is empty"):
        ClientSecurity.from_env()


async def test_a_certificate_rotated_on_disk_is_served_to_new_connections(tmp_path: Path) -> None:
    old, new = make_pki(tmp_path / "old"), make_pki(tmp_path / "new")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(old.server.cert.read_bytes())
    key.write_bytes(old.server.key.read_bytes())
    app = await _serve(_settings(tls_cert_file=cert, tls_key_file=key))
    try:
        async with ClientSecurity(ca_file=old.ca).aio_channel(app.address) as channel:
            assert await _call(channel) == b"anonymous"
        # Half-way through a rotation (the new certificate, the old key) the old pair keeps serving.
        cert.write_bytes(new.server.cert.read_bytes())
        async with ClientSecurity(ca_file=old.ca).aio_channel(app.address) as channel:
            assert await _call(channel) == b"anonymous"
        key.write_bytes(new.server.key.read_bytes())
        async with ClientSecurity(ca_file=new.ca).aio_channel(app.address) as channel:
            assert await _call(channel) == b"anonymous"
        async with ClientSecurity(ca_file=old.ca).aio_channel(app.address) as channel:
            assert await _call(channel) is grpc.StatusCode.UNAVAILABLE
    finally:
        await app.stop(grace=1)


async def test_a_key_that_does_not_match_its_certificate_is_refused_at_start(pki: Pki) -> None:
    with pytest.raises(InvalidArgument, match="is not the key of tls_cert_file"):
        ServiceApp("secure", _settings(tls_cert_file=pki.server.cert, tls_key_file=pki.client.key), [SERVICE])
