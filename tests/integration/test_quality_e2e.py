"""Late labels through the real platform: predictions served by a real gateway (request ids the caller's or the
gateway's) reach the model manager as prediction records in its metric windows; labels sent with LogLabels and
`fresco models labels` give the figures scikit-learn gives on the scores the callers received."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.csv as pcsv  # type: ignore[import-untyped]
import pytest
from typer.testing import CliRunner

from fresco.api.gateway.v1 import gateway_pb2_grpc
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import rollout_pb2 as ro
from fresco.cli_models import app
from fresco.client import predict_request, to_array
from fresco.demo import row_features
from fresco.suite import issue_local_tokens, start_platform
from fresco.training import ExportedModel, demo_dataset, train_classifier
from tests.integration.rollout_platform import (
    RPC_TIMEOUT_S,
    Platform,
    admin,
    apply,
    create_model,
    in_state,
    poll,
    promote,
    register,
    wait_rollout,
)
from tests.model_manager.quality_support import batch, check_binary

pytestmark = pytest.mark.integration

WINDOW_S = 0.5
N = 240


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ExportedModel:
    return train_classifier(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    root = tmp_path_factory.mktemp("platform")
    auth = issue_local_tokens(root / "auth")
    suite = start_platform(root, auth, window_s=WINDOW_S)
    try:
        with admin(suite.services[0].address, auth) as m:
            yield Platform(suite, auth, root, m)
    finally:
        codes = suite.stop()
    assert all(code == 0 for code in codes.values()), codes


def serve(platform: Platform, model: ExportedModel) -> str:
    m, name = platform.manager, f"q-{uuid.uuid4().hex[:8]}"
    create_model(m, name)
    register(m, name, model, 1)
    promote(m, name, 1)
    apply(m, name, 1, ro.RolloutStrategy(blue_green=ro.BlueGreenStrategy()))
    wait_rollout(m, name, in_state(ro.ROLLOUT_STATE_SUCCEEDED))
    return name


def test_labels_joined_to_served_predictions_match_scikit_learn(
    platform: Platform, model: ExportedModel, tmp_path: Path
) -> None:
    name = serve(platform, model)
    data = demo_dataset()
    rows, truth = data.holdout_features[:N], data.holdout_labels[:N].astype(float)
    ids, scores = [], []
    with grpc.insecure_channel(platform.gateway_address) as channel:
        gateway = gateway_pb2_grpc.GatewayServiceStub(channel)
        for i, row in enumerate(rows):
            request = predict_request(name, row_features(model.feature_names, row))
            request.outputs.append("probabilities")  # the score: its last element, the positive class
            if i % 2:
                request.request_id = f"caller-{i}"
            response = gateway.Predict(request, timeout=RPC_TIMEOUT_S)
            assert (response.model_version, response.fallback) == ("1", False)
            assert response.request_id == (f"caller-{i}" if i % 2 else response.request_id)
            ids.append(response.request_id)
            scores.append(float(to_array(response.outputs["probabilities"]).reshape(-1)[-1]))
    assert len(set(ids)) == N, "every prediction has a request id of its own"
    m = platform.manager
    quality = pb.GetPredictionQualityRequest(model_name=name)

    def kept() -> int:
        answer = m.stub.GetPredictionQuality(quality, timeout=RPC_TIMEOUT_S, metadata=m.metadata)
        return answer.versions[0].windows[-1].predictions if answer.versions else 0

    poll(kept, lambda count: count == N, timeout_s=60)

    # Labels for two predictions in three: the first half streamed, the rest from a CSV file.
    labelled = np.arange(N)[np.arange(N) % 3 != 0]
    streamed, filed = labelled[: len(labelled) // 2], labelled[len(labelled) // 2 :]
    sent = batch([(ids[i], truth[i]) for i in streamed], name, "e2e")
    (answer,) = m.stub.LogLabels(iter([sent]), timeout=RPC_TIMEOUT_S, metadata=m.metadata)
    assert (answer.accepted, list(answer.rejected)) == (len(streamed), [])
    table = pa.table({"request_id": [ids[i] for i in filed], "label": truth[filed]})
    pcsv.write_csv(table, tmp_path / "labels.csv")
    args = ["labels", name, str(tmp_path / "labels.csv"), "--service", platform.manager_address]
    args += ["--token-file", str(platform.auth.admin_token_file)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert f"{len(filed)} accepted, 0 rejected" in result.output

    answer_all = m.stub.GetPredictionQuality(quality, timeout=RPC_TIMEOUT_S, metadata=m.metadata)
    every = np.array(scores)
    for window in answer_all.versions[0].windows:
        check_binary(window, truth[labelled], every[labelled], every)
