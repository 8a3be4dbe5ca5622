"""An A/B experiment end to end, every service a real process (fresco.suite.start_platform with the experiment
service): the experiment holds its arms' versions in the model manager, the gateway assigns units locally and routes
each arm to its version, exposures reach the service from the gateway, outcomes flow in over LogOutcomes, the
results recommend shipping, and the decision promotes the winning version through the model manager's gates and the
model's rollout until it serves as production."""

from __future__ import annotations

import random
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest

from chassis.server import channel_options
from chassis.settings import DEFAULT_MAX_MESSAGE_BYTES
from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.api.experiments.v1 import experiment_service_pb2 as pb
from fresco.api.experiments.v1 import experiment_service_pb2_grpc as pb_grpc
from fresco.api.gateway.v1 import gateway_pb2 as gpb
from fresco.api.gateway.v1 import gateway_pb2_grpc
from fresco.api.models.v1 import model_manager_service_pb2 as mpb
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.api.models.v1 import rollout_pb2 as ro
from fresco.client import predict_request
from fresco.demo import row_features
from fresco.suite import LocalAuth, Suite, issue_local_tokens, start_platform
from fresco.training import ExportedModel, train_better_classifier, train_classifier
from tests.integration.rollout_platform import (
    RPC_TIMEOUT_S,
    add_versions,
    admin,
    apply,
    in_state,
    poll,
    register,
    wait_rollout,
)

pytestmark = pytest.mark.integration

UNITS = 400


def arms_experiment(key: str, model: str) -> xpb.Experiment:
    e = xpb.Experiment(
        key=key, hypothesis="v2 converts better than v1", model_name=model, unit_type="user_id", coverage=1.0,
        min_units_per_arm=100,
    )  # fmt: skip
    e.arms.add(name="control", weight=0.5, model_version=1)
    e.arms.add(name="treatment", weight=0.5, model_version=2)
    e.metrics.add(
        name="converted", kind=xpb.METRIC_KIND_PROPORTION, event="purchase", role=xpb.METRIC_ROLE_SUCCESS,
        minimum_detectable_effect=0.02,
    )  # fmt: skip
    return e


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExportedModel, ExportedModel]:
    repository = tmp_path_factory.mktemp("models")
    return train_classifier(repository), train_better_classifier(repository)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Suite, LocalAuth]]:
    root = tmp_path_factory.mktemp("platform")
    auth = issue_local_tokens(root / "auth")
    suite = start_platform(root, auth, window_s=0.5, experiments=True, experiment_flags=("--ship-canary-dwell-s", "1"))
    try:
        yield suite, auth
    finally:
        codes = suite.stop()
    assert all(code == 0 for code in codes.values()), codes


def test_an_ab_experiment_routes_arms_collects_outcomes_and_ships_through_the_gates(
    platform: tuple[Suite, LocalAuth], models: tuple[ExportedModel, ExportedModel]
) -> None:
    suite, auth = platform
    v1, v2 = models
    model = f"ranker-{uuid.uuid4().hex[:6]}"
    options = channel_options(DEFAULT_MAX_MESSAGE_BYTES)
    metadata = auth.admin.metadata()
    with (
        admin(suite.service("model_manager").address, auth) as m,
        auth.admin.channel(suite.service("experiment_service").address, options) as experiments_channel,
        auth.admin.channel(suite.service("gateway").address, options) as gateway_channel,
    ):
        experiments = pb_grpc.ExperimentServiceStub(experiments_channel)
        gateway = gateway_pb2_grpc.GatewayServiceStub(gateway_channel)
        # v1 serves (blue-green); v2 is only registered: its gates have not run.
        add_versions(m, model, _Only(v1), (1,))
        register(m, model, v2, 2)
        apply(m, model, 1, ro.RolloutStrategy(blue_green=ro.BlueGreenStrategy()))
        wait_rollout(m, model, in_state(ro.ROLLOUT_STATE_SUCCEEDED))

        key = f"ab-{uuid.uuid4().hex[:6]}"
        created = experiments.CreateExperiment(
            pb.CreateExperimentRequest(experiment=arms_experiment(key, model)), metadata=metadata
        ).experiment
        started = experiments.StartExperiment(
            pb.StartExperimentRequest(key=key, expected_version=created.version), metadata=metadata
        ).experiment
        assert started.status == xpb.EXPERIMENT_STATUS_RUNNING

        def predict(unit: int) -> gpb.PredictResponse:
            row = row_features(v1.feature_names, v1.sample[unit % len(v1.sample)])
            request = predict_request(model, row, unit_ids={"user_id": f"u{unit}"})
            return gateway.Predict(request, timeout=RPC_TIMEOUT_S, metadata=metadata)

        # The gateway follows the experiment and the route holding v2 at weight 0 within moments of the start.
        poll(
            lambda: [predict(u) for u in range(10)],
            lambda answers: any(a.experiments and a.experiments[0].exposed and a.model_version == "2" for a in answers),
        )
        answers = [predict(u) for u in range(UNITS)]
        arms = Counter((a.experiment_arm, a.model_version, a.experiments[0].exposed) for a in answers)
        assert set(arms) == {("control", "1", True), ("treatment", "2", True)}, arms
        assert min(arms.values()) > UNITS * 0.35, arms  # 50/50 by the frozen hash: ~200 each

        def results() -> pb.GetResultsResponse:
            return experiments.GetResults(pb.GetResultsRequest(key=key), metadata=metadata)

        # Exposures arrive from the gateway's queue, once per unit.
        exposed = poll(results, lambda r: sum(a.units for a in r.results.arms) == UNITS)
        assert {a.arm_name: a.units for a in exposed.results.arms} == {
            "control": arms[("control", "1", True)],
            "treatment": arms[("treatment", "2", True)],
        }

        rng = random.Random(5)
        outcomes = [
            apb.Outcome(
                outcome_id=f"buy-{u}",
                experiment_key=key,
                unit_type="user_id",
                unit_id=f"u{u}",
                event="purchase",
                value=1.0,
            )
            for u, a in enumerate(answers)
            if rng.random() < (0.6 if a.experiment_arm == "treatment" else 0.1)
        ]
        batches = [outcomes[i : i + 50] for i in range(0, len(outcomes), 50)]
        requests = (pb.LogOutcomesRequest(batch_id=f"b{i}", outcomes=b) for i, b in enumerate(batches))
        acks = list(experiments.LogOutcomes(requests, metadata=metadata))
        assert [a.batch_id for a in acks] == [f"b{i}" for i in range(len(batches))]
        assert sum(a.accepted for a in acks) == len(outcomes)
        assert not any(a.rejections for a in acks)

        recommended = results().results.decision
        assert (recommended.action, recommended.arm) == (xpb.DECISION_ACTION_SHIP_TREATMENT, "treatment"), recommended
        assert all(check.passed for check in recommended.checks if check.arm_name == "treatment")

        decided = experiments.DecideExperiment(
            pb.DecideExperimentRequest(key=key, expected_version=started.version), metadata=metadata
        ).experiment
        record = decided.decision
        assert decided.status == xpb.EXPERIMENT_STATUS_DECIDED
        assert (record.action, record.arm) == (xpb.DECISION_ACTION_SHIP_TREATMENT, "treatment")
        assert record.promotion_operation, "v2 had not passed its gates: shipping ran them"
        assert record.rollout_id

        # The model manager runs v2's gates, then the deployment's rollout, to production.
        operation = poll(
            lambda: (
                m.stub.GetOperation(
                    mpb.GetOperationRequest(operation_id=record.promotion_operation), metadata=m.metadata
                ).operation
            ),
            lambda o: o.done,
        )
        assert operation.state == rpb.OPERATION_STATE_SUCCEEDED, operation
        assert operation.gate_results, "the gates ran: nothing bypassed them"
        assert f"experiment {key}" in operation.reason
        done = wait_rollout(m, model, lambda r: r.rollout_id == record.rollout_id and r.state in FINISHED)
        assert done.state == ro.ROLLOUT_STATE_SUCCEEDED, done
        served = m.stub.GetModel(mpb.GetModelRequest(name=model), metadata=m.metadata).model
        assert served.production_version == 2
        # With the experiment decided, the gateway assigns no arm and the route serves v2 to everyone.
        after = poll(lambda: predict(UNITS + 1), lambda a: a.model_version == "2" and not a.experiments)
        assert after.experiment_arm == ""


FINISHED = (ro.ROLLOUT_STATE_SUCCEEDED, ro.ROLLOUT_STATE_FAILED, ro.ROLLOUT_STATE_ROLLED_BACK, ro.ROLLOUT_STATE_ABORTED)


class _Only:
    """The one version `add_versions` registers here (v1)."""

    def __init__(self, v1: ExportedModel) -> None:
        self.v1 = v1

    def of(self, version: int) -> ExportedModel:
        assert version == 1
        return self.v1
