"""DecideExperiment against a real model manager, auth on everywhere: a clear winner's version is promoted through
the manager's gates and its rollout, with a reason citing the experiment; an arm on an unknown version cannot start,
and a version its gates rejected is not shipped."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.api.experiments.v1 import experiment_service_pb2 as pb
from fresco.api.experiments.v1 import experiment_service_pb2_grpc as pb_grpc
from fresco.api.models.v1 import model_manager_service_pb2 as mpb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as mpb_grpc
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.experiments.exposure import exposure_id
from fresco.suite import LocalAuth, ServiceProcess, issue_local_tokens
from tests.experiment_service.service_support import running
from tests.model_manager.gate_support import backtest_gate, train_models, upload, wait_done

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Platform:
    """A model manager with two versions of `model` (v1 in production), and an experiment service that ships through
    it."""

    manager: mpb_grpc.ModelManagerServiceStub
    experiments: pb_grpc.ExperimentServiceStub
    metadata: tuple[tuple[str, str], ...]
    model: str
    versions: tuple[int, int]
    worse: int  # a third version, trained on scrambled labels
    dataset: Path


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    root = tmp_path_factory.mktemp("decide")
    auth: LocalAuth = issue_local_tokens(root / "auth")
    models = train_models(root)
    manager_args = ["--data-dir", str(root / "manager"), "--port", "0", "--metrics-port", "-1", *auth.service_args()]
    manager = ServiceProcess("model_manager", manager_args).start()
    try:
        manager.wait_healthy(60)
        metadata = auth.admin.metadata()
        extra = ("--model-manager-address", manager.address, "--model-manager-token-file", str(auth.control_token_file))
        with (
            grpc.insecure_channel(manager.address) as manager_channel,
            running(root / "experiments", *extra, *auth.service_args()) as service,
            grpc.insecure_channel(service.address) as channel,
        ):
            stub = mpb_grpc.ModelManagerServiceStub(manager_channel)
            model = f"ranker-{uuid.uuid4().hex[:6]}"
            v1 = upload(stub, model, models.good, metadata=metadata)
            v2 = upload(stub, model, models.good, metadata=metadata)
            # v1 is production: the experiment's control, the baseline a shipped version's canary starts from.
            to_production = mpb.PromoteModelVersionRequest(
                model_name=model, version=v1, target_stage=rpb.MODEL_STAGE_PRODUCTION, reason="the control"
            )
            promoted = stub.PromoteModelVersion(to_production, metadata=metadata).operation
            assert wait_done(stub, promoted.operation_id).stage == rpb.MODEL_STAGE_PRODUCTION
            v3 = upload(stub, model, models.worse, metadata=metadata)
            experiments = pb_grpc.ExperimentServiceStub(channel)
            yield Platform(stub, experiments, metadata, model, (v1, v2), v3, models.dataset)
    finally:
        assert manager.stop() == 0, manager.output()


def start(p: Platform, key: str, versions: tuple[int, int]) -> xpb.Experiment:
    e = xpb.Experiment(
        key=key, hypothesis="v2 converts better", model_name=p.model, unit_type="user_id", coverage=1.0,
        min_units_per_arm=50,
    )  # fmt: skip
    e.arms.add(name="control", weight=0.5, model_version=versions[0])
    e.arms.add(name="treatment", weight=0.5, model_version=versions[1])
    e.metrics.add(
        name="converted", kind=xpb.METRIC_KIND_PROPORTION, event="purchase", role=xpb.METRIC_ROLE_SUCCESS,
        minimum_detectable_effect=0.02,
    )  # fmt: skip
    created = p.experiments.CreateExperiment(pb.CreateExperimentRequest(experiment=e), metadata=p.metadata)
    request = pb.StartExperimentRequest(key=key, expected_version=created.experiment.version)
    return p.experiments.StartExperiment(request, metadata=p.metadata).experiment


def feed(p: Platform, e: xpb.Experiment, rates: tuple[float, float], units: int) -> None:
    rng = random.Random(11)
    exposures, outcomes = [], []
    for arm, rate in zip(e.arms, rates, strict=True):
        for u in range(units):
            uid = f"{arm.name}-{u}"
            exposures.append(
                apb.Exposure(
                    exposure_id=exposure_id(e.key, 1, "user_id", uid, arm.name),
                    experiment_key=e.key,
                    phase=1,
                    unit_type="user_id",
                    unit_id=uid,
                    arm_name=arm.name,
                )
            )
            if rng.random() < rate:
                outcomes.append(
                    apb.Outcome(
                        outcome_id=f"o-{uid}",
                        experiment_key=e.key,
                        unit_type="user_id",
                        unit_id=uid,
                        event="purchase",
                        value=1.0,
                    )
                )
    logged = p.experiments.LogExposures(pb.LogExposuresRequest(exposures=exposures), metadata=p.metadata)
    assert logged.accepted == len(exposures)
    batch = pb.LogOutcomesRequest(batch_id="all", outcomes=outcomes)
    (answer,) = list(p.experiments.LogOutcomes(iter([batch]), metadata=p.metadata))
    assert answer.accepted == len(outcomes)


def test_a_clear_winner_is_promoted_through_the_managers_gates(platform: Platform) -> None:
    p = platform
    key = f"ship-{uuid.uuid4().hex[:6]}"
    e = start(p, key, p.versions)
    feed(p, e, (0.1, 0.6), 200)
    request = pb.DecideExperimentRequest(key=key, expected_version=e.version)
    decided = p.experiments.DecideExperiment(request, metadata=p.metadata)
    record = decided.experiment.decision
    assert decided.experiment.status == xpb.EXPERIMENT_STATUS_DECIDED
    assert (record.action, record.arm, record.overridden) == (xpb.DECISION_ACTION_SHIP_TREATMENT, "treatment", False)
    assert decided.results.decision.action == xpb.DECISION_ACTION_SHIP_TREATMENT
    assert record.promotion_operation
    assert record.rollout_id

    # The model had no deployment: shipping declared one, whose rollout waits for the version's gates.
    deployment = p.manager.GetDeployment(mpb.GetDeploymentRequest(model_name=p.model), metadata=p.metadata)
    assert (deployment.deployment.version, deployment.deployment.rollout_id) == (p.versions[1], record.rollout_id)
    assert deployment.deployment.updated_by == "control-plane"  # the experiment service's own token
    rollout = p.manager.GetRolloutStatus(
        mpb.GetRolloutStatusRequest(rollout_id=record.rollout_id), metadata=p.metadata
    ).rollout
    assert rollout.gate_operation_id == record.promotion_operation
    assert rollout.strategy.HasField("canary")
    operation = p.manager.GetOperation(
        mpb.GetOperationRequest(operation_id=record.promotion_operation), metadata=p.metadata
    ).operation
    assert (operation.model_name, operation.version) == (p.model, p.versions[1])
    assert f"experiment {key} " in operation.reason
    assert "converted +" in operation.reason
    assert operation.requested_by == "control-plane"  # the experiment service's own token, not the caller's
    done = wait_done(p.manager, operation.operation_id)
    assert (done.state, done.stage) == (rpb.OPERATION_STATE_SUCCEEDED, rpb.MODEL_STAGE_CANDIDATE)
    assert done.gate_results  # the gates ran: nothing bypassed them


def test_an_arm_on_an_unknown_version_cannot_start(platform: Platform) -> None:
    p = platform
    key = f"ghost-{uuid.uuid4().hex[:6]}"
    with pytest.raises(grpc.RpcError) as caught:
        start(p, key, (p.versions[0], 99))  # the manager has no version 99: it cannot hold it for the arm
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "model manager" in (caught.value.details() or "")
    assert "99" in (caught.value.details() or "")
    after = p.experiments.GetExperiment(pb.GetExperimentRequest(key=key), metadata=p.metadata).experiment
    assert after.status == xpb.EXPERIMENT_STATUS_DRAFT


def test_a_version_its_gates_rejected_is_not_shipped_and_the_experiment_stays_undecided(platform: Platform) -> None:
    p = platform
    key = f"worse-{uuid.uuid4().hex[:6]}"
    e = start(p, key, (p.versions[0], p.worse))
    # The treatment's version then fails its backtest (trained on scrambled labels): the registry rejects it.
    gates = rpb.PromotionGates(backtest=backtest_gate(p.dataset))
    request = mpb.PromoteModelVersionRequest(
        model_name=p.model, version=p.worse, target_stage=rpb.MODEL_STAGE_CANDIDATE, gates=gates, reason="backtest"
    )
    operation = p.manager.PromoteModelVersion(request, metadata=p.metadata).operation
    assert wait_done(p.manager, operation.operation_id).state == rpb.OPERATION_STATE_FAILED
    feed(p, e, (0.1, 0.6), 200)
    decide = pb.DecideExperimentRequest(
        key=key, expected_version=e.version, action=xpb.DECISION_ACTION_SHIP_TREATMENT, reason="ship anyway"
    )
    with pytest.raises(grpc.RpcError) as caught:
        p.experiments.DecideExperiment(decide, metadata=p.metadata)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "rejected" in (caught.value.details() or "")
    after = p.experiments.GetExperiment(pb.GetExperimentRequest(key=key), metadata=p.metadata).experiment
    assert (after.status, after.version) == (xpb.EXPERIMENT_STATUS_RUNNING, e.version)
    assert not after.HasField("decision")
