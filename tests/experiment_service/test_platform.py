"""The experiment service in the local platform (fresco.suite.start_platform): started beside the model manager,
the predictor and the gateway with its own state directory and auth on; stopped cleanly with them."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from fresco.api.experiments.v1 import experiment_service_pb2 as pb
from fresco.api.experiments.v1 import experiment_service_pb2_grpc as pb_grpc
from fresco.suite import issue_local_tokens, start_platform
from tests.experiment_service.service_support import experiment

pytestmark = pytest.mark.integration


def test_the_platform_runs_the_experiment_service(tmp_path: Path) -> None:
    auth = issue_local_tokens(tmp_path / "auth")
    suite = start_platform(tmp_path, auth, window_s=1.0, experiments=True)
    try:
        assert [s.module for s in suite.services] == ["model_manager", "predictor", "experiment_service", "gateway"]
        service = suite.service("experiment_service")
        admin = auth.admin.metadata()
        with auth.admin.channel(service.address) as channel:
            stub = pb_grpc.ExperimentServiceStub(channel)
            request = pb.CreateExperimentRequest(experiment=experiment("exp-platform"))
            created = stub.CreateExperiment(request, metadata=admin)
            entries = stub.ListAuditEntries(pb.ListAuditEntriesRequest(key="exp-platform"), metadata=admin).entries
        with grpc.insecure_channel(service.address) as channel:
            anonymous = pb_grpc.ExperimentServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                anonymous.StartExperiment(pb.StartExperimentRequest(key="exp-platform", expected_version=1))
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        codes = suite.stop()
    assert created.experiment.updated_by == "admin"
    assert [(e.action, e.identity) for e in entries] == [("create", "admin")]
    assert (tmp_path / "experiments" / "experiments.db").exists()
    assert codes == {"gateway": 0, "experiment_service": 0, "predictor": 0, "model_manager": 0}
