"""The Go client (clients/go): `go vet` and its unit tests (the assignment hash against the committed vectors,
value conversion, what a call carries on the wire), then its integration tests against real services: a
predictor, a feature service and a gateway (fresco.suite.start_suite) and an experiment service over mTLS,
auth on for reads too. The Go tests get the addresses, a viewer's token and what the Python client got for the same
calls, and must get the same answers."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fresco.api.common.v1 import values_pb2
from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_service_pb2 as xspb
from fresco.api.experiments.v1 import experiment_service_pb2_grpc as xspb_grpc
from fresco.api.features.v1 import feature_service_pb2 as fpb
from fresco.api.features.v1 import feature_service_pb2_grpc as fpb_grpc
from fresco.client import ExperimentClient, FeatureClient, GatewayClient, feature_columns, outputs, predict_request
from fresco.credentials import ClientSecurity
from fresco.demo import row_features
from fresco.suite import LocalAuth, ServiceProcess, Suite, issue_local_tokens, start_suite
from fresco.training import ExportedModel, train_classifier
from tests.certs import Pki, make_pki
from tests.experiment_service.service_support import experiment, service_args
from tests.golang import run_go
from tests.integration import Reference

pytestmark = pytest.mark.integration

MODULE = Path(__file__).resolve().parents[2] / "clients" / "go"
PACKAGE = "github.com/fresco-ml/fresco/clients/go"
USERS = [11, 12, 13]
REFS = ["user_stats:s0", "user_stats:s1", "user_stats:s2"]
DEFINITIONS = """
entities:
  - name: user
    join_keys: [{name: user_id, type: int64}]
feature_views:
  - name: user_stats
    entities: [user]
    features:
      - {name: s0, type: double}
      - {name: s1, type: double}
      - {name: s2, type: double}
"""
EXPERIMENT = "go-client-arms"
TIMEOUT_S = 20.0
# Reads need a viewer's token too, in every service the Go client calls.
READS_NEED_A_TOKEN = {
    f"FRESCO_{service}_AUTH_REQUIRE_FOR_READS": "true"
    for service in ("PREDICTOR", "FEATURE_SERVICE", "GATEWAY", "EXPERIMENT_SERVICE")
}


@dataclass(frozen=True)
class World:
    """The running services and what the Go tests need to call them."""

    suite: Suite
    auth: LocalAuth
    model: ExportedModel
    pki: Pki
    root: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("go-client")
    auth = issue_local_tokens(root / "auth")
    pki = make_pki(root / "pki")
    model = train_classifier(root / "models", "demo", 1)
    (root / "features.yaml").write_text(DEFINITIONS)
    suite = start_suite(
        root / "models",
        env=READS_NEED_A_TOKEN,
        log_dir=root,
        feature_definitions=root / "features.yaml",
        feature_db=root / "features.db",
        auth=auth,
    )
    try:
        tls = ["--tls-cert-file", str(pki.server.cert), "--tls-key-file", str(pki.server.key)]
        tls += ["--tls-client-ca-file", str(pki.ca)]
        suite.start(
            ServiceProcess(
                "experiment_service",
                service_args(root / "experiments", *tls, *auth.service_args()),
                env=READS_NEED_A_TOKEN,
                log_path=root / "experiment_service.log",
                security=_mtls(pki),
            )
        )
        yield World(suite, auth, model, pki, root)
    finally:
        suite.stop()


def _mtls(pki: Pki, token: str | None = None) -> ClientSecurity:
    return ClientSecurity(token=token, ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.client.key)


def test_go_vet_and_unit_tests() -> None:
    run_go(["vet", "-tags", "integration", "./..."], MODULE)
    output = run_go(["test", "-count=1", "./..."], MODULE)
    for package in ("assignment", "fresco"):
        assert re.search(rf"^ok\s+{PACKAGE}/{package}\s", output, re.MULTILINE), output


def _predictions(world: World, rows: np.ndarray) -> dict[str, object]:
    """What the Python client gets for each row alone, and for all of them in one PredictBatch."""
    names = world.model.feature_names
    address = world.suite.service("gateway").address
    with GatewayClient(address, security=world.auth.admin) as client:
        single = [outputs(client.predict("demo", row_features(names, row))) for row in rows]
        batch = client.predict_batch([predict_request("demo", row_features(names, row)) for row in rows])
    together = [outputs(response) for response in batch.responses]
    # They are real answers: ONNX Runtime in this process agrees.
    expected = Reference(world.model).predict(rows)
    for answers in (single, together):
        assert [int(a["label"]) for a in answers] == expected["label"].tolist()
        got = np.array([a["probabilities"] for a in answers])
        np.testing.assert_allclose(got, expected["probabilities"], rtol=1e-5, atol=1e-6)
    return {
        "labels": [int(a["label"]) for a in single],
        "probabilities": [a["probabilities"].tolist() for a in single],
        "batch_labels": [int(a["label"]) for a in together],
        "batch_probabilities": [a["probabilities"].tolist() for a in together],
    }


def _pushed_features(world: World) -> dict[str, list[float]]:
    """Values pushed for USERS through the feature service, by feature ref."""
    values = np.random.default_rng(12).normal(size=(len(USERS), len(REFS))).tolist()
    rows = [
        fpb.FeatureRow(
            entity_key=values_pb2.EntityKey(join_keys={"user_id": values_pb2.Value(int64_value=user)}),
            features={ref.split(":")[1]: values_pb2.Value(double_value=v) for ref, v in zip(REFS, row, strict=True)},
        )
        for user, row in zip(USERS, values, strict=True)
    ]
    with world.auth.admin.channel(world.suite.service("feature_service").address) as channel:
        pushed = fpb_grpc.FeatureServiceStub(channel).PushFeatures(
            iter([fpb.PushFeaturesRequest(feature_view="user_stats", rows=rows)]),
            timeout=TIMEOUT_S,
            metadata=world.auth.admin.metadata(),
        )
    assert (pushed.accepted_count, pushed.rejected_count) == (len(USERS), 0)
    by_ref = {ref: [row[j] for row in values] for j, ref in enumerate(REFS)}
    with FeatureClient(world.suite.service("feature_service").address, security=world.auth.admin) as client:
        assert feature_columns(client.get_features([{"user_id": user} for user in USERS], REFS)) == by_ref
    return by_ref


def _assignments(world: World, units: list[str]) -> dict[str, list[str]]:
    """An experiment of three arms on 80% of users, started; and its Assign answers to the Python stub."""
    admin = _mtls(world.pki, world.auth.admin.token)
    with admin.channel(world.suite.service("experiment_service").address) as channel:
        stub = xspb_grpc.ExperimentServiceStub(channel)
        created = stub.CreateExperiment(
            xspb.CreateExperimentRequest(experiment=experiment(EXPERIMENT, (0.2, 0.3, 0.5), coverage=0.8)),
            timeout=TIMEOUT_S,
            metadata=admin.metadata(),
        ).experiment
        stub.StartExperiment(
            xspb.StartExperimentRequest(key=EXPERIMENT, expected_version=created.version),
            timeout=TIMEOUT_S,
            metadata=admin.metadata(),
        )
    viewer = _mtls(world.pki, world.auth.gateway_token_file.read_text().strip())
    with ExperimentClient(world.suite.service("experiment_service").address, security=viewer) as client:
        answer = client.assign([{"user_id": unit} for unit in units], [EXPERIMENT])
    assigned = [unit.assignments[0] for unit in answer.units]
    return {
        "units": units,
        "reasons": [apb.AssignmentReason.Name(a.reason) for a in assigned],
        "arms": [a.arm_name for a in assigned],
    }


@pytest.fixture(scope="module")
def expected(world: World) -> Path:
    """What the Python client got, written where the Go tests read it."""
    rows = world.model.sample[[0, 1, 2, 17, 99]]
    assignments = _assignments(world, [f"user-{i}" for i in range(60)])
    # Units both in and out of the coverage, so the Go side cannot pass by answering one way.
    assert set(assignments["reasons"]) == {"ASSIGNMENT_REASON_ASSIGNED", "ASSIGNMENT_REASON_OUTSIDE_COVERAGE"}
    document = {
        "model": "demo",
        "model_version": "1",
        "input": world.model.input_name,
        "feature_names": world.model.feature_names,
        "rows": rows.astype(np.float64).tolist(),
        **_predictions(world, rows),
        "user_ids": USERS,
        "feature_refs": REFS,
        "feature_values": _pushed_features(world),
        "experiment": EXPERIMENT,
        "unit_type": "user_id",
        **assignments,
    }
    path = world.root / "expected.json"
    path.write_text(json.dumps(document))
    return path


def _go_env(world: World, expected: Path) -> dict[str, str]:
    return {
        "FRESCO_IT_EXPECTED": str(expected),
        "FRESCO_IT_GATEWAY": world.suite.service("gateway").address,
        "FRESCO_IT_PREDICTOR": world.suite.service("predictor").address,
        "FRESCO_IT_FEATURE_SERVICE": world.suite.service("feature_service").address,
        "FRESCO_IT_EXPERIMENT_SERVICE": world.suite.service("experiment_service").address,
        "FRESCO_IT_TOKEN": world.auth.gateway_token_file.read_text().strip(),  # a viewer's
        # The experiment service's connection comes from the variables the Python client reads too.
        "FRESCO_TOKEN_FILE": str(world.auth.gateway_token_file),
        "FRESCO_TLS_CA_FILE": str(world.pki.ca),
        "FRESCO_TLS_CERT_FILE": str(world.pki.client.cert),
        "FRESCO_TLS_KEY_FILE": str(world.pki.client.key),
    }


def test_go_client_against_running_services(world: World, expected: Path) -> None:
    output = run_go(
        ["test", "-count=1", "-tags", "integration", "-run", "^TestIntegration", "-v", "./fresco/"],
        MODULE,
        env=_go_env(world, expected),
    )
    passed = re.findall(r"^--- PASS: (TestIntegration\w+)", output, re.MULTILINE)
    assert len(passed) == 7, output
    assert "--- SKIP" not in output, output


def test_a_wrong_answer_fails_the_go_tests(world: World, expected: Path, tmp_path: Path) -> None:
    """The Go tests compare for real: one probability off by one unit in the last place fails them."""
    document = json.loads(expected.read_text())
    document["probabilities"][0][0] = float(np.nextafter(document["probabilities"][0][0], 2.0))
    changed = tmp_path / "expected.json"
    changed.write_text(json.dumps(document))
    with pytest.raises(pytest.fail.Exception, match=r"row 0: got label"):
        run_go(
            ["test", "-count=1", "-tags", "integration", "-run", "^TestIntegrationPredictEquals", "./fresco/"],
            MODULE,
            env=_go_env(world, changed),
        )
