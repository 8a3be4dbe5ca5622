"""The Python client's calls against real services: predict and predict batch through a gateway (named features
and entity keys, answers equal to ONNX Runtime's), get_features from a feature service, assign from an experiment
service over mutual TLS (equal to the experiment hash computed here), blocking and asyncio; each call's bearer
token, deadline and W3C trace context reach the service (a deadline ends a call a server never answers), and the
services' errors keep their gRPC status."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from fresco.api.common.v1 import values_pb2
from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_service_pb2_grpc as xpb_grpc
from fresco.api.features.v1 import feature_service_pb2 as fpb
from fresco.api.features.v1 import feature_service_pb2_grpc as fpb_grpc
from fresco.client import (
    AsyncExperimentClient,
    AsyncFeatureClient,
    AsyncGatewayClient,
    ExperimentClient,
    FeatureClient,
    GatewayClient,
    arms,
    assignment_unit,
    entity_key,
    feature_columns,
    outputs,
    predict_request,
)
from fresco.credentials import ClientSecurity
from fresco.experiments.assignment import Placement
from fresco.suite import ServiceProcess, Suite, issue_local_tokens, start_suite
from fresco.training import train_classifier
from tests.certs import make_pki
from tests.experiment_service.service_support import create_and_start, experiment, service_args
from tests.integration import Reference

pytestmark = pytest.mark.integration

MODEL = "by_user"
REFS = [f"user_stats:s{i}" for i in range(8)]
DEFINITIONS = """
entities:
  - name: user
    join_keys: [{name: user_id, type: int64}]
feature_views:
  - name: user_stats
    entities: [user]
    features:
""" + "".join(f"      - {{name: s{i}, type: double}}\n" for i in range(8))
# Auth on, and reads need a token too (they are open by default), so that a call without one is refused.
READS_NEED_A_TOKEN = {
    "FRESCO_GATEWAY_AUTH_REQUIRE_FOR_READS": "true",
    "FRESCO_FEATURE_SERVICE_AUTH_REQUIRE_FOR_READS": "true",
}
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACE = {"traceparent": f"00-{TRACE_ID}-b7ad6b7169203331-01", "tracestate": "vendor=value"}


@dataclass(frozen=True)
class Platform:
    """A gateway, predictor and feature service with auth on; users 0..4 have stored features `rows`."""

    suite: Suite
    reference: Reference
    security: ClientSecurity
    rows: np.ndarray

    def address(self, module: str) -> str:
        return self.suite.service(module).address


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    root = tmp_path_factory.mktemp("python-client")
    model = train_classifier(root / "models", name=MODEL, feature_names=REFS)
    (root / "definitions.yaml").write_text(DEFINITIONS)
    auth = issue_local_tokens(root / "auth")
    suite = start_suite(
        root / "models",
        env=READS_NEED_A_TOKEN,
        log_dir=root,
        feature_definitions=root / "definitions.yaml",
        feature_db=root / "f.db",
        auth=auth,
    )
    try:
        rows = model.sample[:5].astype(np.float64)
        push = fpb.PushFeaturesRequest(
            feature_view="user_stats",
            rows=[
                fpb.FeatureRow(
                    entity_key=entity_key({"user_id": user}),
                    features={f"s{i}": values_pb2.Value(double_value=v) for i, v in enumerate(row)},
                )
                for user, row in enumerate(rows.tolist())
            ],
        )
        with auth.admin.channel(suite.service("feature_service").address) as channel:
            pushed = fpb_grpc.FeatureServiceStub(channel).PushFeatures(
                iter([push]), timeout=30, metadata=auth.admin.metadata()
            )
        assert (pushed.accepted_count, pushed.rejected_count) == (5, 0)
        yield Platform(suite, Reference(model), auth.admin, rows)
    finally:
        suite.stop()


def _features(row: np.ndarray) -> dict[str, float]:
    return dict(zip(REFS, row.tolist(), strict=True))


def _probabilities(answers: list[dict[str, np.ndarray]]) -> np.ndarray:
    return np.array([a["probabilities"] for a in answers])


def test_predict_and_predict_batch_answer_as_onnxruntime(platform: Platform) -> None:
    expected = platform.reference.predict(platform.rows)["probabilities"].astype(np.float64)
    with GatewayClient(platform.address("gateway"), security=platform.security) as client:
        one_by_one = [outputs(client.predict(MODEL, _features(row))) for row in platform.rows]
        np.testing.assert_array_equal(_probabilities(one_by_one), expected)

        # By entity key: the gateway fetches the stored features of each user.
        users = [4, 0, 2]
        batch = client.predict_batch([predict_request(MODEL, {}, entity_keys=[{"user_id": u}]) for u in users])
        np.testing.assert_array_equal(_probabilities([outputs(r) for r in batch.responses]), expected[users])

        only = client.predict(MODEL, _features(platform.rows[1]), request_id="r-1", output_names=["probabilities"])
        assert (set(only.outputs), only.request_id, only.model) == ({"probabilities"}, "r-1", MODEL)


async def test_the_asyncio_clients_answer_the_same(platform: Platform) -> None:
    expected = platform.reference.predict(platform.rows)["probabilities"].astype(np.float64)
    async with AsyncGatewayClient(platform.address("gateway"), security=platform.security) as client:
        answer = await client.predict(MODEL, {}, entity_keys=[{"user_id": 3}], trace=TRACE)
        np.testing.assert_array_equal(outputs(answer)["probabilities"], expected[3])
        assert answer.trace_id == TRACE_ID
        batch = await client.predict_batch([predict_request(MODEL, _features(row)) for row in platform.rows])
        np.testing.assert_array_equal(_probabilities([outputs(r) for r in batch.responses]), expected)
    async with AsyncFeatureClient(platform.address("feature_service"), security=platform.security) as features:
        served = await features.get_features([{"user_id": 2}], REFS, timeout_s=5.0)
        assert feature_columns(served) == {
            ref: [value] for ref, value in zip(REFS, platform.rows[2].tolist(), strict=True)
        }


def test_token_trace_context_deadline_and_errors_reach_the_gateway(platform: Platform) -> None:
    address = platform.address("gateway")
    row = _features(platform.rows[0])
    with GatewayClient(address, security=platform.security) as client:
        assert client.predict(MODEL, row, trace=TRACE).trace_id == TRACE_ID, "the gateway joined the caller's trace"
        assert client.predict(MODEL, row).trace_id != TRACE_ID

        with pytest.raises(grpc.RpcError) as unknown:
            client.predict("no-such-model", row)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no-such-model" in (unknown.value.details() or "")

        with pytest.raises(ValueError, match=r"trace\['traceparent'\]"):
            client.predict(MODEL, row, trace={"traceparent": "00-not-a-trace"})

    with GatewayClient(address) as anonymous, pytest.raises(grpc.RpcError) as refused:
        anonymous.predict(MODEL, row)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_get_features_reads_stored_values_and_nulls(platform: Platform) -> None:
    refs = REFS[:3]
    with FeatureClient(platform.address("feature_service"), security=platform.security) as client:
        served = client.get_features(
            [{"user_id": 1}, {"user_id": 777}], refs, include_event_timestamps=True, max_staleness_s=3600.0
        )
    assert feature_columns(served) == {ref: [platform.rows[1][i], None] for i, ref in enumerate(refs)}
    assert [list(c.statuses) for c in served.columns] == [
        [fpb.FEATURE_STATUS_PRESENT, fpb.FEATURE_STATUS_NOT_FOUND] for _ in refs
    ]
    assert all(len(c.event_timestamps) == 2 for c in served.columns)

    with FeatureClient(platform.address("feature_service")) as anonymous, pytest.raises(grpc.RpcError) as refused:
        anonymous.get_features([{"user_id": 1}], refs)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture
def experiments_over_mtls(tmp_path: Path) -> Iterator[tuple[ServiceProcess, ClientSecurity]]:
    """An experiment service speaking only TLS and asking for a client certificate, and the security to reach it."""
    pki = make_pki(tmp_path / "pki")
    tls = ["--tls-cert-file", str(pki.server.cert), "--tls-key-file", str(pki.server.key)]
    security = ClientSecurity(ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.client.key)
    process = ServiceProcess(
        "experiment_service",
        service_args(tmp_path / "state", *tls, "--tls-client-ca-file", str(pki.ca)),
        security=security,
    ).start()
    try:
        process.wait_healthy(60)
        yield process, security
    finally:
        assert process.stop() == 0, process.output()


async def test_assign_over_mtls_places_units_as_the_experiment_hash_does(
    experiments_over_mtls: tuple[ServiceProcess, ClientSecurity],
) -> None:
    process, security = experiments_over_mtls
    units = [f"u{i}" for i in range(200)]
    weights = (0.3, 0.7)
    with security.channel(process.address) as channel:
        started = create_and_start(xpb_grpc.ExperimentServiceStub(channel), experiment("checkout", weights))
    placement = Placement(started.salt or started.key, weights, started.coverage)
    expected = [{"checkout": f"arm{placement.arm(u)}"} for u in units]

    with ExperimentClient(process.address, security=security) as client:
        answer = client.assign([{"user_id": u} for u in units], experiment_keys=["checkout"], trace=TRACE)
        assert arms(answer) == expected
        # A unit without the experiment's unit type is not assigned, and says why.
        (missing,) = client.assign([assignment_unit({"session_id": "s"}, {"country": "fr"})]).units
        assert [(a.experiment_key, a.reason) for a in missing.assignments] == [
            ("checkout", apb.ASSIGNMENT_REASON_MISSING_UNIT_ID)
        ]
    async with AsyncExperimentClient(process.address, security=security) as async_client:
        assert arms(await async_client.assign([{"user_id": u} for u in units[:20]])) == expected[:20]

    with ExperimentClient(process.address) as plaintext, pytest.raises(grpc.RpcError) as refused:
        plaintext.assign([{"user_id": "u0"}], timeout_s=5.0)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_deadlines_end_calls_a_server_never_answers() -> None:
    # A listening socket that never speaks HTTP/2: only the call's deadline can end the call.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        with GatewayClient(address, timeout_s=0.2) as client, pytest.raises(grpc.RpcError) as by_default:
            client.predict(MODEL, {"f": 1.0})
        assert by_default.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with FeatureClient(address, timeout_s=600) as features, pytest.raises(grpc.RpcError) as per_call:
            features.get_features([{"user_id": 1}], REFS, timeout_s=0.2)
        assert per_call.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        async with AsyncExperimentClient(address, timeout_s=600) as experiments:
            with pytest.raises(grpc.RpcError) as in_asyncio:
                await experiments.assign([{"user_id": "1"}], timeout_s=0.2)
        assert in_asyncio.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
