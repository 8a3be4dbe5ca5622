"""The demo's deliberately bad v3 in a real predictor: it loads and passes the zero warm-up (the predictor turns
healthy), then answers the rows whose first feature is small and fails the others with a server error, never
with the INVALID_ARGUMENT of a caller's bad input (which would not count against a canary)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from fresco.api.inference import grpc_service_pb2_grpc
from fresco.suite import ServiceProcess
from fresco.training import ExportedModel, demo_dataset, train_classifier, write_failing_model
from tests.integration import CLIENT_OPTIONS, Reference, assert_matches_reference, decode_outputs, infer_request

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ExportedModel]:
    """A repository serving only v3 of the demo model, and v1 it derives from (kept outside)."""
    root = tmp_path_factory.mktemp("failing")
    v1 = train_classifier(root / "v1", "demo", 1)
    write_failing_model(v1, root / "v1", 3)
    repository = root / "repository"
    shutil.copytree(root / "v1" / "demo", repository / "demo", ignore=shutil.ignore_patterns("1"))
    return repository, v1


@pytest.fixture(scope="module")
def predictor(models: tuple[Path, ExportedModel]) -> Iterator[ServiceProcess]:
    repository, _ = models
    process = ServiceProcess("predictor", ["--model-repository", str(repository), "--port", "0"]).start()
    try:
        process.wait_healthy(120)  # healthy means v3 loaded and answered its warm-up
        yield process
    finally:
        assert process.stop() == 0


def test_v3_serves_small_rows_and_fails_the_rest_with_a_server_error(
    predictor: ServiceProcess, models: tuple[Path, ExportedModel]
) -> None:
    _, v1 = models
    reference = Reference(v1)
    rows = demo_dataset().holdout_features[:60]
    codes: dict[grpc.StatusCode, int] = {}
    with grpc.insecure_channel(predictor.address, options=CLIENT_OPTIONS) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for row in rows:
            try:
                response = stub.ModelInfer(infer_request(row[None, :], version="3"), timeout=30)
            except grpc.RpcError as err:
                code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
                codes[code] = codes.get(code, 0) + 1
                continue
            codes[grpc.StatusCode.OK] = codes.get(grpc.StatusCode.OK, 0) + 1
            assert abs(row[0]) < 0.5
            assert_matches_reference(decode_outputs(response), reference.predict(row[None, :]))
    failing = int(np.sum(np.abs(rows[:, 0]) >= 0.5))
    assert codes == {grpc.StatusCode.OK: len(rows) - failing, grpc.StatusCode.INTERNAL: failing}
    assert failing > len(rows) // 2
