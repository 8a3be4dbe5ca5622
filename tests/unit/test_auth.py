"""Bearer tokens and roles: static token files, signed JWTs, the access policy, and the chassis
interceptor enforcing them on a real in-process grpc.aio server."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict

from chassis.auth import (
    AccessPolicy,
    Authenticator,
    Identity,
    JwtVerifier,
    Role,
    StaticTokens,
    TokenFile,
    bearer_token,
    current_identity,
    method_roles,
    token_line,
)
from chassis.errors import InvalidArgument, PermissionDenied, Unauthenticated
from chassis.server import ServiceApp
from chassis.settings import ServiceSettings
from fresco.api.inference import grpc_service_pb2

SECRET = b"s" * 32
AUDIENCE = "fresco"
ISSUER = "https://issuer.test"
SERVICE = "fresco.unittest.v1.Guarded"
WRITE = f"/{SERVICE}/Write"
READ = f"/{SERVICE}/Read"
WATCH = f"/{SERVICE}/Watch"
CHAT = f"/{SERVICE}/Chat"
TOKENS = {"ana": ("admin", "ana-admin-token"), "dev": ("deployer", "dev-token"), "vic": ("viewer", "vic-token")}


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": "ci-bot", "aud": AUDIENCE, "iss": ISSUER, "exp": now + 600, "roles": ["deployer"]}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _hs256(**overrides: Any) -> str:
    return jwt.encode(_claims(**overrides), SECRET, algorithm="HS256")


def _verifier(**kwargs: Any) -> JwtVerifier:
    return JwtVerifier(audience=AUDIENCE, issuer=ISSUER, leeway_s=0, **{"secret": SECRET, **kwargs})


def _unauthenticated(call: Any, *args: Any) -> str:
    with pytest.raises(Unauthenticated) as caught:
        call(*args)
    return str(caught.value)


# --- static tokens ---


def _token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    lines = [
        "# local tokens",
        "",
        *(token_line(name, Role.parse(role), token) for name, (role, token) in TOKENS.items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_static_token_file_names_the_holder_and_role(tmp_path: Path) -> None:
    tokens = StaticTokens.load(_token_file(tmp_path))
    assert tokens.verify("dev-token") == Identity("dev", Role.DEPLOYER, "token-file")
    assert tokens.verify("ana-admin-token") == Identity("ana", Role.ADMIN, "token-file")
    assert tokens.verify("unknown-token") is None
    # The file holds hashes only.
    assert "dev-token" not in (tmp_path / "tokens").read_text()


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("ana:root:" + "0" * 64, "expected one of viewer, deployer, admin, got 'root'"),
        ("ana:admin:abc", "expected the token's sha256 as 64 hex digits"),
        ("ana:admin", "expected name:role:sha256hex"),
        (":admin:" + "0" * 64, "expected name:role:sha256hex"),
    ],
)
def test_malformed_token_file_names_file_and_line(tmp_path: Path, line: str, expected: str) -> None:
    path = tmp_path / "tokens"
    path.write_text("# header\n" + line + "\n")
    with pytest.raises(InvalidArgument) as caught:
        StaticTokens.load(path)
    assert str(caught.value).startswith(f"{path}:2: ")
    assert expected in str(caught.value)


def test_token_file_follows_its_changes_and_keeps_the_last_good_tokens(tmp_path: Path) -> None:
    path = _token_file(tmp_path)
    now = [0.0]
    tokens = TokenFile(path, check_s=1.0, clock=lambda: now[0])
    assert tokens.verify("vic-token") == Identity("vic", Role.VIEWER, "token-file")
    # vic revoked, eve added.
    path.write_text(f"{token_line('ana', Role.ADMIN, 'ana-admin-token')}\n{token_line('eve', Role.DEPLOYER, 'eve')}\n")
    assert tokens.verify("vic-token") is not None  # not looked at again before check_s has passed
    now[0] = 1.0
    assert tokens.verify("vic-token") is None
    assert tokens.verify("eve") == Identity("eve", Role.DEPLOYER, "token-file")
    # An edit half-way (a malformed line) keeps the tokens loaded before.
    path.write_text("eve:deploy")
    now[0] = 2.0
    assert tokens.verify("eve") == Identity("eve", Role.DEPLOYER, "token-file")


def test_unknown_static_token_is_unauthenticated_without_echoing_it(tmp_path: Path) -> None:
    authenticator = Authenticator(StaticTokens.load(_token_file(tmp_path)))
    message = _unauthenticated(authenticator.authenticate, "guessed-secret-value")
    assert "guessed-secret-value" not in message
    assert authenticator.authenticate("vic-token").role is Role.VIEWER


# --- JWTs ---


def test_valid_hs256_token_gives_subject_and_highest_role() -> None:
    identity = _verifier().verify(_hs256(roles=["viewer", "deployer", "astronaut"]))
    assert identity == Identity("ci-bot", Role.DEPLOYER, "jwt")
    assert _verifier().verify(_hs256(roles="admin")).role is Role.ADMIN
    assert _verifier().verify(_hs256(roles=["astronaut"])).role is Role.NONE


# Tokens are made when the test runs, not when it is collected: a suite that takes longer than their
# ten-minute lifetime to reach them must not find the valid ones expired.
@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: _hs256(exp=int(time.time()) - 60), "bearer token: expired"),
        (lambda: _hs256(nbf=int(time.time()) + 600), "bearer token: not valid yet (nbf)"),
        (lambda: _hs256(aud="another-service"), "bearer token: audience is not 'fresco'"),
        (lambda: _hs256(iss="https://evil.test"), "bearer token: issuer is not 'https://issuer.test'"),
        (lambda: _hs256(exp=None), "bearer token: claim 'exp' is missing"),
        (lambda: _hs256(sub=None), "bearer token: claim 'sub' is missing"),
        (lambda: jwt.encode(_claims(), b"x" * 32, algorithm="HS256"), "bearer token: signature does not verify"),
        (lambda: jwt.encode(_claims(), None, algorithm="none"), "algorithm 'none' is not accepted"),
        (lambda: "not.a.token", "bearer token: not a token this service knows"),
    ],
    ids=["expired", "nbf", "audience", "issuer", "no-exp", "no-sub", "signature", "alg-none", "garbage"],
)
def test_bad_jwts_are_unauthenticated_saying_why(make: Callable[[], str], expected: str) -> None:
    token = make()
    message = _unauthenticated(_verifier().verify, token)
    assert expected in message
    assert token not in message


def _pem(private_key: Any) -> bytes:
    public: bytes = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return public


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _private_key(algorithm: str) -> Any:
    if algorithm == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_public_key_tokens_verify_and_forgeries_do_not(algorithm: str) -> None:
    private = _private_key(algorithm)
    pem = _pem(private)
    verifier = JwtVerifier(audience=AUDIENCE, public_key_pem=pem)
    assert verifier.verify(jwt.encode(_claims(roles="admin"), private, algorithm=algorithm)).role is Role.ADMIN
    wrong_key = jwt.encode(_claims(), _private_key(algorithm), algorithm=algorithm)
    assert "signature does not verify" in _unauthenticated(verifier.verify, wrong_key)
    # The classic confusion: an HS256 token whose HMAC secret is the (public) key.
    signing_input = _b64(b'{"alg":"HS256","typ":"JWT"}') + "." + _b64(json.dumps(_claims(roles="admin")).encode())
    forged = signing_input + "." + _b64(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())
    assert "algorithm 'HS256' is not accepted" in _unauthenticated(verifier.verify, forged)


def test_short_hs256_secret_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="at least 32 bytes"):
        JwtVerifier(audience=AUDIENCE, secret=b"short")


def test_authenticator_tries_the_token_file_then_jwts(tmp_path: Path) -> None:
    authenticator = Authenticator(StaticTokens.load(_token_file(tmp_path)), _verifier())
    assert authenticator.authenticate("ana-admin-token").source == "token-file"
    assert authenticator.authenticate(_hs256()).source == "jwt"
    assert "expired" in _unauthenticated(authenticator.authenticate, _hs256(exp=int(time.time()) - 60))


# --- metadata, policy and tables ---


def test_bearer_header_parsing() -> None:
    assert bearer_token([("x-other", "1"), ("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("authorization", b"bearer  abc ")]) == "abc"
    assert bearer_token([]) is None
    assert "expected 'Bearer <token>'" in _unauthenticated(bearer_token, [("authorization", "Basic dXNlcg==")])


def test_policy_codes_name_the_role_needed() -> None:
    policy = AccessPolicy({WRITE: Role.DEPLOYER, READ: None})
    assert policy.required(READ) is Role.NONE
    assert policy.required(f"/{SERVICE}/Unlisted") is Role.ADMIN
    assert policy.required("/grpc.health.v1.Health/Check") is Role.NONE
    with pytest.raises(Unauthenticated, match=f"{WRITE} needs a bearer token with role deployer or higher"):
        policy.check(WRITE, None)
    with pytest.raises(PermissionDenied, match="needs role deployer or higher; 'vic' has viewer"):
        policy.check(WRITE, Identity("vic", Role.VIEWER, "token-file"))
    policy.check(WRITE, Identity("dev", Role.DEPLOYER, "token-file"))
    policy.check(WRITE, Identity("ana", Role.ADMIN, "token-file"))
    strict = AccessPolicy({WRITE: Role.DEPLOYER, READ: None}, require_for_reads=True)
    assert strict.required(READ) is Role.VIEWER
    assert strict.required("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is Role.VIEWER
    assert strict.required("/grpc.health.v1.Health/Check") is Role.NONE


def test_role_tables_must_list_every_method() -> None:
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    with pytest.raises(ValueError, match=r"unlisted .*'RepositoryModelUnload'"):
        method_roles(service, {"RepositoryModelLoad": Role.DEPLOYER}, [m.name for m in service.methods][:-2])


def test_services_declare_their_write_roles() -> None:
    from feature_service.service import METHOD_ROLES as FEATURES
    from gateway.service import METHOD_ROLES as GATEWAY
    from predictor.service import METHOD_ROLES as PREDICTOR

    assert PREDICTOR["/inference.GRPCInferenceService/RepositoryModelLoad"] is Role.DEPLOYER
    assert PREDICTOR["/inference.GRPCInferenceService/RepositoryModelUnload"] is Role.DEPLOYER
    assert PREDICTOR["/inference.GRPCInferenceService/ModelInfer"] is None
    assert PREDICTOR["/inference.GRPCInferenceService/ServerLive"] is Role.NONE
    assert FEATURES["/fresco.features.v1.FeatureService/PushFeatures"] is Role.DEPLOYER
    assert FEATURES["/fresco.features.v1.FeatureService/Materialize"] is Role.DEPLOYER
    assert FEATURES["/fresco.features.v1.FeatureService/GetFeatures"] is None
    assert set(GATEWAY.values()) == {None}


# --- settings ---


class GuardSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FRESCO_UNITGUARD_")


def _settings(**overrides: Any) -> GuardSettings:
    values: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": -1}
    return GuardSettings(**{**values, **overrides})


def test_auth_is_on_only_with_a_token_source(tmp_path: Path) -> None:
    assert not _settings().auth_enabled
    assert _settings(auth_tokens_file=_token_file(tmp_path)).auth_enabled
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    with pytest.raises(ValidationError, match="auth_jwt_audience is required"):
        _settings(auth_jwt_secret_file=secret)
    with pytest.raises(ValidationError, match="auth_tokens_file"):
        _settings(auth_tokens_file=tmp_path / "missing")


# --- the interceptor on a real server ---


class Guarded:
    """Handlers answering with the identity the chassis made current."""

    @staticmethod
    def _who() -> bytes:
        identity = current_identity()
        return b"anonymous" if identity is None else f"{identity.subject}:{identity.role.label}".encode()

    async def write(self, request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
        return self._who()

    async def read(self, request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
        return self._who()

    async def watch(self, request: bytes, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        for _ in range(2):
            yield self._who()

    async def chat(
        self, requests: AsyncIterator[bytes], context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request + b":" + self._who()


async def _start(tmp_path: Path, **overrides: Any) -> ServiceApp:
    table: dict[str, Role | None] = {WRITE: Role.DEPLOYER, READ: None, WATCH: Role.VIEWER, CHAT: Role.ADMIN}
    app = ServiceApp(
        "guarded", _settings(auth_tokens_file=_token_file(tmp_path), **overrides), [SERVICE], method_roles=table
    )
    guarded = Guarded()
    app.server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Write": grpc.unary_unary_rpc_method_handler(guarded.write),
                    "Read": grpc.unary_unary_rpc_method_handler(guarded.read),
                    "Watch": grpc.unary_stream_rpc_method_handler(guarded.watch),
                    "Chat": grpc.stream_stream_rpc_method_handler(guarded.chat),
                },
            ),
        )
    )
    await app.start()
    await app.set_serving(True)
    return app


def _bearer(name: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[name][1]}"),)


async def _call(channel: aio.Channel, method: str, metadata: Any = ()) -> bytes | grpc.StatusCode:
    try:
        result: bytes = await channel.unary_unary(method)(b"", metadata=metadata, timeout=10)
    except aio.AioRpcError as err:
        return err.code()
    return result


async def test_interceptor_enforces_roles_and_exposes_the_identity(tmp_path: Path) -> None:
    app = await _start(tmp_path)
    try:
        async with aio.insecure_channel(app.address) as channel:
            assert await _call(channel, WRITE) is grpc.StatusCode.UNAUTHENTICATED
            assert await _call(channel, WRITE, _bearer("vic")) is grpc.StatusCode.PERMISSION_DENIED
            assert await _call(channel, WRITE, _bearer("dev")) == b"dev:deployer"
            assert await _call(channel, WRITE, _bearer("ana")) == b"ana:admin"
            # A client-supplied name is never the identity.
            assert await _call(channel, WRITE, (*_bearer("dev"), ("x-user", "ana"))) == b"dev:deployer"
            assert await _call(channel, READ) == b"anonymous"
            assert await _call(channel, READ, _bearer("vic")) == b"vic:viewer"
            assert await _call(channel, READ, (("authorization", "Bearer wrong"),)) is grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(aio.AioRpcError) as caught:
                await channel.unary_unary(WRITE)(b"", metadata=_bearer("vic"), timeout=10)
            assert caught.value.details() == f"{WRITE} needs role deployer or higher; 'vic' has viewer"
            stream = channel.unary_stream(WATCH)(b"", metadata=_bearer("vic"), timeout=10)
            assert [item async for item in stream] == [b"vic:viewer", b"vic:viewer"]
            refused = channel.unary_stream(WATCH)(b"", timeout=10)
            with pytest.raises(aio.AioRpcError) as caught:
                [item async for item in refused]
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
            chat = channel.stream_stream(CHAT)(iter([b"a", b"b"]), metadata=_bearer("ana"), timeout=10)
            assert [item async for item in chat] == [b"a:ana:admin", b"b:ana:admin"]
            denied = channel.stream_stream(CHAT)(iter([b"a"]), metadata=_bearer("dev"), timeout=10)
            with pytest.raises(aio.AioRpcError) as caught:
                [item async for item in denied]
            assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        labels = {"service": "guarded", "method": WRITE, "code": "UNAUTHENTICATED"}
        assert app.registry.get_sample_value("fresco_rpc_requests_total", labels) == 1
    finally:
        await app.stop(grace=1)


async def test_reads_need_a_viewer_when_required_but_health_stays_open(tmp_path: Path) -> None:
    app = await _start(tmp_path, auth_require_for_reads=True)
    try:
        async with aio.insecure_channel(app.address) as channel:
            assert await _call(channel, READ) is grpc.StatusCode.UNAUTHENTICATED
            assert await _call(channel, READ, _bearer("vic")) == b"vic:viewer"
            for metadata in ((), (("authorization", "Bearer wrong"),)):
                health = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), metadata=metadata, timeout=10
                )
                assert health.status == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(aio.AioRpcError) as caught:
                [r async for r in reflection.ServerReflectionInfo(iter([request]), timeout=10)]
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
            answers = [
                r async for r in reflection.ServerReflectionInfo(iter([request]), metadata=_bearer("vic"), timeout=10)
            ]
            assert SERVICE in {s.name for s in answers[0].list_services_response.service}
    finally:
        await app.stop(grace=1)


async def test_without_a_token_source_everything_stays_open(tmp_path: Path) -> None:
    app = ServiceApp("open", _settings(), [SERVICE], method_roles={WRITE: Role.ADMIN})
    guarded = Guarded()
    handlers = {"Write": grpc.unary_unary_rpc_method_handler(guarded.write)}
    app.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    await app.start()
    try:
        async with aio.insecure_channel(app.address) as channel:
            assert await _call(channel, WRITE) == b"anonymous"
    finally:
        await app.stop(grace=1)
