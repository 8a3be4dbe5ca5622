"""TLS and mTLS between real service processes, with certificates the test makes: the predictor (two
workers) and the feature service require client certificates (and a viewer token, even on reads),
the gateway serves TLS and reaches both over mTLS with its own token. Clients without a certificate,
or without TLS, are refused."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest

from chassis.auth import Role, new_token, token_line
from fresco.api.common.v1 import values_pb2
from fresco.api.features.v1 import feature_service_pb2 as fpb
from fresco.api.features.v1 import feature_service_pb2_grpc as fpb_grpc
from fresco.api.gateway.v1 import gateway_pb2 as gpb
from fresco.api.gateway.v1 import gateway_pb2_grpc as gpb_grpc
from fresco.api.inference import grpc_service_pb2 as pb
from fresco.api.inference import grpc_service_pb2_grpc as pb_grpc
from fresco.client import GatewayClient, outputs
from fresco.credentials import ClientSecurity
from fresco.suite import ServiceProcess, Suite
from fresco.training import train_classifier
from tests.certs import Pki, make_pki
from tests.integration import Reference

pytestmark = pytest.mark.integration

REFS = [f"stats:s{i}" for i in range(8)]
DEFINITIONS = """
entities:
  - {name: user, join_keys: [{name: user_id, type: int64}]}
feature_views:
  - name: stats
    entities: [user]
    features:
""" + "".join(f"      - {{name: s{i}, type: double}}\n" for i in range(8))


@dataclass(frozen=True)
class Mesh:
    """The three services over TLS, the certificates and the tokens."""

    services: dict[str, ServiceProcess]
    pki: Pki
    deployer: str
    reference: Reference


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("tls")
    pki = make_pki(root / "pki")
    model = train_classifier(root / "models", name="by_user", feature_names=REFS)
    (root / "features.yaml").write_text(DEFINITIONS)
    gateway_token, deployer = new_token(), new_token()
    (root / "tokens").write_text(
        f"{token_line('gateway', Role.VIEWER, gateway_token)}\n{token_line('ops', Role.DEPLOYER, deployer)}\n"
    )
    (root / "gateway.token").write_text(gateway_token)
    mtls = ["--tls-cert-file", str(pki.server.cert), "--tls-key-file", str(pki.server.key)]
    mtls += [
        "--tls-client-ca-file",
        str(pki.ca),
        "--auth-tokens-file",
        str(root / "tokens"),
        "--auth-require-for-reads",
    ]
    health = ClientSecurity(ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.client.key)
    suite = Suite()
    try:
        features = suite.start(
            ServiceProcess(
                "feature_service",
                [
                    "--definitions",
                    str(root / "features.yaml"),
                    "--sqlite-path",
                    str(root / "f.db"),
                    "--port",
                    "0",
                    *mtls,
                ],
                security=health,
                log_path=root / "feature_service.log",
            )
        )
        predictor = suite.start(
            ServiceProcess(
                "predictor",
                ["--model-repository", str(root / "models"), "--port", "0", "--workers", "2", *mtls],
                security=health,
                log_path=root / "predictor.log",
            )
        )
        peers = ["--peer-tls-ca-file", str(pki.ca), "--peer-tls-cert-file", str(pki.client.cert)]
        peers += ["--peer-tls-key-file", str(pki.client.key), "--peer-token-file", str(root / "gateway.token")]
        serving = ["--port", "0", "--tls-cert-file", str(pki.server.cert), "--tls-key-file", str(pki.server.key)]
        gateway = suite.start(
            ServiceProcess(
                "gateway",
                ["--predictor", predictor.address, "--feature-service", features.address, *peers, *serving],
                security=ClientSecurity(ca_file=pki.ca),
                log_path=root / "gateway.log",
            )
        )
        services = {"feature_service": features, "predictor": predictor, "gateway": gateway}
        yield Mesh(services, pki, deployer, Reference(model))
    finally:
        suite.stop()


def _user(user_id: int) -> values_pb2.EntityKey:
    return values_pb2.EntityKey(join_keys={"user_id": values_pb2.Value(int64_value=user_id)})


def _code(call: Any, request: object, **kwargs: object) -> grpc.StatusCode:
    try:
        call(request, timeout=10, **kwargs)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_gateway_reaches_predictor_and_feature_service_over_mtls(mesh: Mesh) -> None:
    rows = np.random.default_rng(11).normal(size=(3, 8)).astype(np.float32)
    client = ClientSecurity(
        token=mesh.deployer, ca_file=mesh.pki.ca, cert_file=mesh.pki.client.cert, key_file=mesh.pki.client.key
    )
    with client.channel(mesh.services["feature_service"].address) as channel:
        push = fpb.PushFeaturesRequest(
            feature_view="stats",
            rows=[
                fpb.FeatureRow(
                    entity_key=_user(u),
                    features={f"s{i}": values_pb2.Value(double_value=float(v)) for i, v in enumerate(row)},
                )
                for u, row in enumerate(rows)
            ],
        )
        pushed = fpb_grpc.FeatureServiceStub(channel).PushFeatures(iter([push]), metadata=client.metadata(), timeout=10)
    assert (pushed.accepted_count, pushed.rejected_count) == (3, 0)

    # Features fetched over mTLS, then inference over mTLS, behind a TLS front door.
    with ClientSecurity(ca_file=mesh.pki.ca).channel(mesh.services["gateway"].address) as channel:
        answer = gpb_grpc.GatewayServiceStub(channel).Predict(
            gpb.PredictRequest(model="by_user", entity_keys=[_user(2)]), timeout=30
        )
    np.testing.assert_allclose(
        list(answer.outputs["probabilities"].double_values),
        mesh.reference.predict(rows[2:3])["probabilities"][0],
        rtol=1e-5,
        atol=1e-6,
    )
    # The SDK's client over TLS, features given by name.
    with GatewayClient(mesh.services["gateway"].address, security=ClientSecurity(ca_file=mesh.pki.ca)) as sdk:
        by_name = sdk.predict("by_user", {ref: float(v) for ref, v in zip(REFS, rows[0].tolist(), strict=True)})
    np.testing.assert_allclose(
        outputs(by_name)["probabilities"], mesh.reference.predict(rows[:1])["probabilities"][0], rtol=1e-5, atol=1e-6
    )


def test_mtls_refuses_clients_without_a_certificate(mesh: Mesh) -> None:
    address = mesh.services["predictor"].address
    with ClientSecurity(ca_file=mesh.pki.ca).channel(address) as no_certificate:
        assert _code(pb_grpc.GRPCInferenceServiceStub(no_certificate).ServerLive, pb.ServerLiveRequest()) is (
            grpc.StatusCode.UNAVAILABLE
        )
    certified = ClientSecurity(ca_file=mesh.pki.ca, cert_file=mesh.pki.client.cert, key_file=mesh.pki.client.key)
    with certified.channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
        # Reads need a viewer here: the gateway's answers above came with its own token.
        assert _code(stub.ModelMetadata, pb.ModelMetadataRequest(name="by_user")) is grpc.StatusCode.UNAUTHENTICATED


def test_tls_services_refuse_plaintext(mesh: Mesh) -> None:
    with grpc.insecure_channel(mesh.services["gateway"].address) as plaintext:
        request = gpb.PredictRequest(model="by_user", entity_keys=[_user(0)])
        assert _code(gpb_grpc.GatewayServiceStub(plaintext).Predict, request) is grpc.StatusCode.UNAVAILABLE
    with ClientSecurity(ca_file=mesh.pki.other_ca).channel(mesh.services["gateway"].address) as untrusting:
        request = gpb.PredictRequest(model="by_user", entity_keys=[_user(0)])
        assert _code(gpb_grpc.GatewayServiceStub(untrusting).Predict, request) is grpc.StatusCode.UNAVAILABLE


def test_mtls_without_a_server_certificate_is_refused_at_start(mesh: Mesh) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--port", "0", "--tls-client-ca-file", str(mesh.pki.ca)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file" in result.stderr
