"""Bearer tokens and roles on real service processes: a predictor of two workers and a feature service
with auth on (a static token file and an HS256 JWT secret). Protected calls without a token are
UNAUTHENTICATED, with too small a role PERMISSION_DENIED naming the role needed, with the right role OK;
reads stay open; the CLI materialises through the service with a token file."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest
from typer.testing import CliRunner

from chassis.auth import Role, token_line
from fresco.api.common.v1 import values_pb2
from fresco.api.features.v1 import feature_service_pb2 as fpb
from fresco.api.features.v1 import feature_service_pb2_grpc as fpb_grpc
from fresco.api.inference import grpc_service_pb2 as pb
from fresco.api.inference import grpc_service_pb2_grpc as pb_grpc
from fresco.cli_features import app as features_cli
from fresco.credentials import ClientSecurity
from fresco.suite import ServiceProcess, Suite
from fresco.training import train_classifier
from tests.integration import CLIENT_OPTIONS, Reference, decode_outputs, infer_request

pytestmark = pytest.mark.integration

SECRET = b"integration-secret-of-32-bytes-at-least"
AUDIENCE = "fresco-test"
TOKENS = {"ana": (Role.ADMIN, "ana-admin-token"), "dev": (Role.DEPLOYER, "dev-token"), "vic": (Role.VIEWER, "vic")}
DEFINITIONS = """
entities:
  - {name: user, join_keys: [{name: user_id, type: int64}]}
feature_views:
  - name: stats
    entities: [user]
    features:
      - {name: clicks, type: int64}
"""
LOAD = "/inference.GRPCInferenceService/RepositoryModelLoad"
PUSH = "/fresco.features.v1.FeatureService/PushFeatures"
PREDICTOR_ARGS = ["--port", "0", "--workers", "2", "--model-control-mode", "explicit", "--load-model", "demo"]


@dataclass(frozen=True)
class Secured:
    """The running services and the files their tokens live in."""

    predictor: ServiceProcess
    features: ServiceProcess
    root: Path


def _bearer(name: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[name][1]}"),)


def _jwt(**claims: Any) -> tuple[tuple[str, str], ...]:
    payload = {"sub": "rollout-bot", "aud": AUDIENCE, "exp": int(time.time()) + 600, "roles": ["admin"], **claims}
    return (("authorization", f"Bearer {jwt.encode(payload, SECRET, algorithm='HS256')}"),)


@pytest.fixture(scope="module")
def secured(repository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    root = tmp_path_factory.mktemp("auth")
    (root / "tokens").write_text("\n".join(token_line(n, role, t) for n, (role, t) in TOKENS.items()) + "\n")
    (root / "jwt.secret").write_bytes(SECRET)
    (root / "features.yaml").write_text(DEFINITIONS)
    auth = ["--auth-tokens-file", str(root / "tokens"), "--auth-jwt-secret-file", str(root / "jwt.secret")]
    auth += ["--auth-jwt-audience", AUDIENCE]
    sources = ["--port", "0", "--materialize-source-dirs", str(root)]
    suite = Suite()
    try:
        predictor = suite.start(
            ServiceProcess(
                "predictor",
                [*PREDICTOR_ARGS, "--model-repository", str(repository.root), *auth],
                log_path=root / "predictor.log",
            )
        )
        features = suite.start(
            ServiceProcess(
                "feature_service",
                ["--definitions", str(root / "features.yaml"), "--sqlite-path", str(root / "f.db"), *sources, *auth],
                log_path=root / "feature_service.log",
            )
        )
        yield Secured(predictor, features, root)
    finally:
        suite.stop()


def _code(call: Any, request: Any, metadata: Any = ()) -> tuple[grpc.StatusCode, str]:
    try:
        call(request, metadata=metadata, timeout=60)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def test_repository_calls_need_a_deployer(secured: Secured) -> None:
    with grpc.insecure_channel(secured.predictor.address, options=CLIENT_OPTIONS) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        load = pb.RepositoryModelLoadRequest(model_name="echo")
        code, details = _code(stub.RepositoryModelLoad, load)
        assert code is grpc.StatusCode.UNAUTHENTICATED
        assert details == f"{LOAD} needs a bearer token with role deployer or higher; none was sent"
        code, details = _code(stub.RepositoryModelLoad, load, _bearer("vic"))
        assert code is grpc.StatusCode.PERMISSION_DENIED
        assert details == f"{LOAD} needs role deployer or higher; 'vic' has viewer"
        code, details = _code(stub.RepositoryModelLoad, load, _jwt(exp=int(time.time()) - 120))
        assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, "bearer token: expired")
        code, details = _code(stub.RepositoryModelLoad, load, _jwt(aud="someone-else"))
        assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, f"bearer token: audience is not '{AUDIENCE}'")
        assert stub.ModelReady(pb.ModelReadyRequest(name="echo"), timeout=10).ready is False

        # A deployer loads on every worker: the workers pass the caller's token on to each other.
        assert _code(stub.RepositoryModelLoad, load, _bearer("dev")) == (grpc.StatusCode.OK, "")
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=10)
        assert {m.name for m in index.models} == {"demo", "echo"}
        # An admin by JWT unloads it again.
        unload = pb.RepositoryModelUnloadRequest(model_name="echo")
        assert _code(stub.RepositoryModelUnload, unload, _jwt()) == (grpc.StatusCode.OK, "")
        assert stub.ModelReady(pb.ModelReadyRequest(name="echo"), timeout=10).ready is False


def test_predictor_reads_stay_open(secured: Secured, reference: Reference, sample: np.ndarray) -> None:
    with grpc.insecure_channel(secured.predictor.address, options=CLIENT_OPTIONS) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        answer = stub.ModelInfer(infer_request(sample[:4]), timeout=30)
        np.testing.assert_allclose(
            decode_outputs(answer)["probabilities"], reference.predict(sample[:4])["probabilities"], rtol=1e-5
        )
        assert stub.ModelMetadata(pb.ModelMetadataRequest(name="demo"), timeout=10).name == "demo"
        # A token that is sent must be valid, even on a read.
        code, _ = _code(stub.ModelMetadata, pb.ModelMetadataRequest(name="demo"), (("authorization", "Bearer nope"),))
        assert code is grpc.StatusCode.UNAUTHENTICATED


def _push(user_id: int, clicks: int) -> Iterator[fpb.PushFeaturesRequest]:
    key = values_pb2.EntityKey(join_keys={"user_id": values_pb2.Value(int64_value=user_id)})
    row = fpb.FeatureRow(entity_key=key, features={"clicks": values_pb2.Value(int64_value=clicks)})
    yield fpb.PushFeaturesRequest(feature_view="stats", rows=[row])


def _clicks(stub: fpb_grpc.FeatureServiceStub, user_id: int) -> int:
    key = values_pb2.EntityKey(join_keys={"user_id": values_pb2.Value(int64_value=user_id)})
    answer = stub.GetFeatures(fpb.GetFeaturesRequest(entity_keys=[key], feature_refs=["stats:clicks"]), timeout=10)
    return int(answer.columns[0].values[0].int64_value)


def test_feature_writes_need_a_deployer_and_reads_stay_open(secured: Secured) -> None:
    with grpc.insecure_channel(secured.features.address) as channel:
        stub = fpb_grpc.FeatureServiceStub(channel)
        code, details = _code(stub.PushFeatures, _push(1, 10))
        assert code is grpc.StatusCode.UNAUTHENTICATED
        assert details == f"{PUSH} needs a bearer token with role deployer or higher; none was sent"
        code, details = _code(stub.PushFeatures, _push(1, 10), _bearer("vic"))
        assert (code, details) == (
            grpc.StatusCode.PERMISSION_DENIED,
            f"{PUSH} needs role deployer or higher; 'vic' has viewer",
        )
        materialize = fpb.MaterializeRequest(feature_view="stats", source_uri=str(secured.root / "none.parquet"))
        assert _code(stub.Materialize, materialize, _bearer("vic"))[0] is grpc.StatusCode.PERMISSION_DENIED
        pushed = stub.PushFeatures(_push(1, 10), metadata=_bearer("dev"), timeout=10)
        assert (pushed.accepted_count, pushed.rejected_count) == (1, 0)
        assert _clicks(stub, 1) == 10


def test_cli_materializes_through_the_service_with_a_token_file(secured: Secured) -> None:
    source = secured.root / "stats.parquet"
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array([7, 8], pa.int64()),
                "clicks": pa.array([70, 80], pa.int64()),
                "event_timestamp": [time.time() - 10] * 2,
            }
        ),
        source,
    )
    args = ["materialize", "--view", "stats", "--source", str(source), "--service", secured.features.address]
    refused = CliRunner().invoke(features_cli, args, env={"FRESCO_TOKEN_FILE": "", "FRESCO_TOKEN": ""})
    assert refused.exit_code == 1
    assert "UNAUTHENTICATED" in refused.output
    token_file = secured.root / "admin.token"
    token_file.write_text(TOKENS["ana"][1] + "\n")
    done = CliRunner().invoke(features_cli, [*args, "--token-file", str(token_file)])
    assert done.exit_code == 0, done.output
    assert "wrote 2 entities" in done.output
    with grpc.insecure_channel(secured.features.address) as channel:
        assert _clicks(fpb_grpc.FeatureServiceStub(channel), 8) == 80


def test_fresco_up_runs_with_auth_on_and_hands_out_an_admin_token(tmp_path: Path) -> None:
    train_classifier(tmp_path / "models")
    (tmp_path / "features.yaml").write_text(DEFINITIONS)
    state = tmp_path / "state"
    command = [sys.executable, "-m", "fresco.cli", "up", "--model-repository", str(tmp_path / "models")]
    command += ["--feature-definitions", str(tmp_path / "features.yaml"), "--state-dir", str(state)]
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert process.stdout is not None
    seen: list[str] = []
    try:
        for line in process.stdout:  # `fresco up` prints "gateway ready" once every service is healthy
            seen.append(line)
            if "gateway ready at" in line or len(seen) > 200:
                break
        startup = "".join(seen)
        assert "gateway ready at" in startup, startup
        assert f"admin token: {state / 'admin.token'}" in startup
        match = re.search(r"feature_service\W+(127\.0\.0\.1:\d+)", startup)
        assert match is not None, startup
        assert (state / "tokens").stat().st_mode & 0o077 == 0
        admin = ClientSecurity.from_env(state / "admin.token")
        with grpc.insecure_channel(match[1]) as channel:
            stub = fpb_grpc.FeatureServiceStub(channel)
            assert _code(stub.PushFeatures, _push(3, 30))[0] is grpc.StatusCode.UNAUTHENTICATED
            pushed = stub.PushFeatures(_push(3, 30), metadata=admin.metadata(), timeout=10)
            assert pushed.accepted_count == 1
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        rest = process.stdout.read()
        process.stdout.close()
    assert process.returncode == 0, rest
    assert "feature_service exited with code 0" in rest
