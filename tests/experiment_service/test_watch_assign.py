"""WatchExperiments and Assign through the real service process: snapshot, updates with their base revision,
acks, a snapshot after a rejection, resume from a revision in the history (else a snapshot), the revision growing
across restarts, and Assign giving the same answers as the watched configuration, before and after a restart."""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from fresco.api.common.v1 import values_pb2
from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.api.experiments.v1 import experiment_service_pb2 as pb
from fresco.api.experiments.v1 import experiment_service_pb2_grpc as pb_grpc
from fresco.experiments.evaluator import Evaluator
from tests.experiment_service.service_support import Gateway, create_and_start, experiment, running, stub_for

pytestmark = pytest.mark.integration

COUNTRIES = ["fr", "de", "us"]
UNITS = [
    apb.AssignmentUnit(
        unit_ids={"user_id": f"u{i}"}, attributes={"country": values_pb2.Value(string_value=COUNTRIES[i % 3])}
    )
    for i in range(300)
]


def keys_of(config: apb.AssignmentConfig) -> list[str]:
    return [e.key for e in config.experiments]


def test_watch_snapshot_updates_acks_and_resume(tmp_path: Path) -> None:
    with running(tmp_path) as process, stub_for(process) as stub:
        first = create_and_start(stub, experiment("exp-one"))
        gateway = Gateway(stub, "gw-1")
        snapshot = gateway.next().snapshot
        assert (snapshot.revision, keys_of(snapshot)) == (1, ["exp-one"])
        assert snapshot.experiments[0].version == first.version
        gateway.ack(1)

        create_and_start(stub, experiment("exp-two"))
        update = gateway.next().update
        assert (update.base_revision, update.revision, [e.key for e in update.upserted]) == (1, 2, ["exp-two"])
        assert list(update.removed_keys) == []
        gateway.ack(2)

        patch = pb.UpdateExperimentRequest(
            experiment=experiment("exp-one", (0.2, 0.8)), update_mask=FieldMask(paths=["arms"]), expected_version=2
        )
        assert stub.UpdateExperiment(patch).new_phase
        update = gateway.next().update
        assert (update.base_revision, update.revision) == (2, 3)
        (changed,) = update.upserted
        assert (changed.key, changed.phase, [a.weight for a in changed.arms]) == ("exp-one", 2, [0.2, 0.8])
        gateway.ack(3)

        stub.StopExperiment(pb.StopExperimentRequest(key="exp-two", expected_version=2, reason="done"))
        update = gateway.next().update
        assert (update.base_revision, update.revision, list(update.removed_keys)) == (3, 4, ["exp-two"])
        assert list(update.upserted) == []
        gateway.ack(4, accepted=False, error="experiments[exp-two]: no")  # a rejected update: a snapshot follows
        resync = gateway.next()
        assert resync.WhichOneof("kind") == "snapshot"
        assert (resync.snapshot.revision, keys_of(resync.snapshot)) == (4, ["exp-one"])
        gateway.close()

        resumed = Gateway(stub, "gw-2", resume=2)  # still in the history: only what changed since
        update = resumed.next().update
        assert (update.base_revision, update.revision, list(update.removed_keys)) == (2, 4, ["exp-two"])
        assert [e.key for e in update.upserted] == ["exp-one"]
        resumed.close()
        unknown = Gateway(stub, "gw-3", resume=999)  # not a revision this service published: a snapshot past it
        snapshot = unknown.next().snapshot
        assert (snapshot.revision, keys_of(snapshot)) == (1000, ["exp-one"])
        unknown.close()

        bad = Gateway(stub)
        bad.ack(1)
        with pytest.raises(grpc.RpcError) as raised:
            bad.next()
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (raised.value.details() or "").startswith("subscribe: expected the first message to be a subscription")


def assign(stub: pb_grpc.ExperimentServiceStub, **fields: object) -> pb.AssignResponse:
    return stub.Assign(pb.AssignRequest(units=UNITS, **fields))  # type: ignore[arg-type]


def test_assignment_and_revision_survive_restarts(tmp_path: Path) -> None:
    targeted = experiment(
        "exp-targeted",
        (0.9, 0.1),
        coverage=0.7,
        namespace=xpb.Namespace(id="checkout", start=0, end=6000),
        targeting=[
            xpb.TargetingCondition(
                attribute="country",
                operator=xpb.CONDITION_OPERATOR_IN,
                values=[values_pb2.Value(string_value="fr"), values_pb2.Value(string_value="de")],
            )
        ],
    )
    with running(tmp_path) as process, stub_for(process) as stub:
        create_and_start(stub, targeted)
        create_and_start(stub, experiment("exp-params", (1, 1, 1), model_name="", arms=[
            xpb.Arm(name=n, weight=1, parameters={"ranker": n}) for n in ("a", "b", "c")
        ]))  # fmt: skip
        before = assign(stub)
        gateway = Gateway(stub, "gw-1")
        snapshot = gateway.next().snapshot
        gateway.close()
    # Assign answers from the very configuration gateways watch: the same evaluator gives the same answers.
    local = Evaluator(snapshot)
    assert before.revision == snapshot.revision == 2
    for unit, answer in zip(UNITS, before.units, strict=True):
        assert [a.to_proto() for a in local.assign(unit.unit_ids, unit.attributes)] == list(answer.assignments)
    reasons = {a.reason for u in before.units for a in u.assignments if a.experiment_key == "exp-targeted"}
    assert reasons == {
        apb.ASSIGNMENT_REASON_ASSIGNED,
        apb.ASSIGNMENT_REASON_TARGETING_MISMATCH,
        apb.ASSIGNMENT_REASON_OUTSIDE_NAMESPACE,
        apb.ASSIGNMENT_REASON_OUTSIDE_COVERAGE,
    }
    rankers = {a.parameters.get("ranker") for u in before.units for a in u.assignments if a.arm_name}
    assert rankers == {"a", "b", "c", None}  # None: the targeted experiment's arms carry no parameters

    with running(tmp_path) as process, stub_for(process) as stub:
        assert assign(stub) == before  # same units, same arms, same revision
        resumed = Gateway(stub, "gw-1", resume=2)  # the restarted service was seeded with revision 2
        update = resumed.next().update
        assert (update.base_revision, update.revision, list(update.upserted), list(update.removed_keys)) == (
            2,
            2,
            [],
            [],
        )
        stub.StopExperiment(pb.StopExperimentRequest(key="exp-params", expected_version=2))
        update = resumed.next().update
        assert (update.base_revision, update.revision, list(update.removed_keys)) == (2, 3, ["exp-params"])
        resumed.close()
        after = assign(stub)
    assert after.revision == 3
    with running(tmp_path) as process, stub_for(process) as stub:
        create_and_start(stub, experiment("exp-later"))
        assert assign(stub).revision == 4  # still growing after a second restart


def test_assign_filters_and_refuses_bad_input(tmp_path: Path) -> None:
    with running(tmp_path, "--max-assign-units", "5") as process, stub_for(process) as stub:
        create_and_start(stub, experiment("exp-m"))
        create_and_start(stub, experiment("exp-other", model_name="other"))
        stub.CreateExperiment(pb.CreateExperimentRequest(experiment=experiment("exp-draft")))
        units = UNITS[:5]
        by_model = stub.Assign(pb.AssignRequest(units=units, model_name="other"))
        assert {a.experiment_key for u in by_model.units for a in u.assignments} == {"exp-other"}
        chosen = stub.Assign(pb.AssignRequest(units=units, experiment_keys=["exp-draft", "exp-m"]))
        for unit in chosen.units:
            assert [(a.experiment_key, a.reason) for a in unit.assignments] == [
                ("exp-draft", apb.ASSIGNMENT_REASON_NOT_RUNNING),
                ("exp-m", apb.ASSIGNMENT_REASON_ASSIGNED),
            ]
        missing = stub.Assign(pb.AssignRequest(units=[apb.AssignmentUnit(unit_ids={"device_id": "d"})]))
        assert {a.reason for a in missing.units[0].assignments} == {apb.ASSIGNMENT_REASON_MISSING_UNIT_ID}

        unknown = f"exp-{uuid.uuid4().hex[:8]}"
        for request, code, text in (
            (pb.AssignRequest(units=units, experiment_keys=[unknown]), grpc.StatusCode.NOT_FOUND, "experiment_keys"),
            (
                pb.AssignRequest(units=units, experiment_keys=["Bad"]),
                grpc.StatusCode.INVALID_ARGUMENT,
                "experiment_keys[0]",
            ),
            (pb.AssignRequest(units=UNITS[:6]), grpc.StatusCode.INVALID_ARGUMENT, "units: expected at most 5 units"),
        ):
            with pytest.raises(grpc.RpcError) as raised:
                stub.Assign(request)
            assert raised.value.code() == code
            assert (raised.value.details() or "").startswith(text)
