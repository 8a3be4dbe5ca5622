"""Through the model manager's RPCs, in process: a deployment's gates run before any traffic (and a rejected
version stays refused until forced), per-step sample minimums, the blue-green warm-up and manual switch, rollback
on an unhealthy version, and max_replicas handed to the fleet; and a real manager process running a deployment's
gates."""

from __future__ import annotations

import hashlib
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as pb_grpc
from fresco.api.models.v1 import registry_pb2 as regpb
from fresco.api.models.v1 import rollout_pb2 as rpb
from fresco.suite import ServiceProcess
from model_manager.lifecycle import Stage
from model_manager.records import ModelSpec, VersionSpec
from tests.model_manager import gate_support
from tests.model_manager.registry_support import artifact
from tests.model_manager.rollout_support import (
    LocalFleet,
    LocalHub,
    applied,
    canary,
    make_model,
    manager,
    status,
    wait_for,
    window,
)

if TYPE_CHECKING:
    from tests.model_manager.rollout_support import Stub

GATES = regpb.PromotionGates(schema=regpb.SchemaGate())


async def upload(stub: Stub, model: str, content: bytes) -> int:
    meta = pb.UploadModelVersionMetadata(
        model_name=model,
        format=regpb.MODEL_FORMAT_ONNX,
        expected_sha256=hashlib.sha256(content).hexdigest(),
        expected_size_bytes=len(content),
        signature=gate_support.signature(),
    )
    requests = [pb.UploadModelVersionRequest(metadata=meta), pb.UploadModelVersionRequest(chunk=content)]
    return int((await stub.UploadModelVersion(iter(requests))).model_version.version)


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value


def types(r: rpb.Rollout) -> list[int]:
    return [e.type for e in r.events]


def served_versions(hub: LocalHub, model: str) -> set[str]:
    """Every version any published table ever routed the model to."""
    out: set[str] = set()
    for table in hub.published:
        for route in table.routes:
            if route.model == model:
                out |= {v.version for v in route.versions}
    return out


async def test_gates_run_on_apply_before_any_traffic_and_a_rejected_version_waits_for_a_forced_promotion(
    tmp_path: Path,
) -> None:
    models = gate_support.train_models(tmp_path)
    fleet, hub = LocalFleet(), LocalHub()
    async with manager(tmp_path / "mm", fleet, hub) as (mm, stub):
        registry = mm.registry
        assert registry is not None
        model = f"g-{uuid.uuid4().hex[:8]}"
        registry.create_model(ModelSpec(name=model, owner="risk", signature=gate_support.signature()), "tester")
        for stage in (Stage.VALIDATING, Stage.CANDIDATE, Stage.PRODUCTION):
            if stage is Stage.VALIDATING:
                assert await upload(stub, model, models.good) == 1
            registry.set_stage(model, 1, stage, "tester")
        assert await upload(stub, model, models.good) == 2
        assert await upload(stub, model, b"not an onnx model") == 3
        strategy = canary(rpb.CanaryStep(traffic_percent=50))

        def deployment(version: int, **fields: object) -> pb.Deployment:
            return pb.Deployment(model_name=model, version=version, strategy=strategy, gates=GATES, **fields)  # type: ignore[arg-type]

        # A registered version: apply starts its gates; the rollout loads nothing before they pass.
        first = await stub.ApplyDeployment(
            pb.ApplyDeploymentRequest(deployment=deployment(2, replicas=2, max_replicas=3), reason="v2")
        )
        operation = first.rollout.gate_operation_id
        assert operation
        assert f"promotion gates running as operation {operation}" in first.message
        assert first.rollout.state == rpb.ROLLOUT_STATE_PENDING
        rid = first.rollout.rollout_id
        done = await wait_for(status(stub, rid), lambda r: r.state == rpb.ROLLOUT_STATE_SUCCEEDED, 60.0)
        kinds = types(done)
        assert kinds.index(rpb.ROLLOUT_EVENT_TYPE_GATES_STARTED) < kinds.index(rpb.ROLLOUT_EVENT_TYPE_GATES_PASSED)
        assert kinds.index(rpb.ROLLOUT_EVENT_TYPE_GATES_PASSED) < kinds.index(rpb.ROLLOUT_EVENT_TYPE_VERSION_READY)
        assert rpb.ROLLOUT_EVENT_TYPE_UNSPECIFIED not in kinds
        assert ("schema.artifact", True) in [(g.name, g.passed) for g in done.gate_results]
        ran = (await stub.GetOperation(pb.GetOperationRequest(operation_id=operation))).operation
        assert (ran.passed, ran.requested_by, ran.reason) == (True, "anonymous", "v2")
        assert registry.get_model(model).production_version == 2
        assert fleet.placements[(model, 2)] == (2, 3), "replicas and max_replicas reach the fleet"

        # A version failing its gates: the rollout fails with the results and nothing of it is loaded or served.
        bad = await stub.ApplyDeployment(pb.ApplyDeploymentRequest(deployment=deployment(3), reason="v3"))
        rid3 = bad.rollout.rollout_id
        failed = await wait_for(status(stub, rid3), lambda r: r.state == rpb.ROLLOUT_STATE_FAILED, 60.0)
        assert "gates failed" in failed.message
        assert failed.gate_operation_id == bad.rollout.gate_operation_id
        assert [g.name for g in failed.gate_results if not g.passed], failed.gate_results
        assert rpb.ROLLOUT_EVENT_TYPE_GATES_FAILED in types(failed)
        assert registry.get_version(model, 3).stage is Stage.REJECTED
        assert (model, 3) not in fleet.placements
        assert "3" not in served_versions(hub, model)
        assert hub.weights(model) == {"2": 10000}

        # The same spec again reports the failure; a changed one and a retry are refused: no silent retry.
        again = await stub.ApplyDeployment(pb.ApplyDeploymentRequest(deployment=deployment(3), reason="v3"))
        assert again.outcome == pb.APPLY_OUTCOME_HELD
        assert "gates failed" in again.message
        assert "PromoteModelVersion with force and a reason" in again.message
        placement = await stub.ApplyDeployment(pb.ApplyDeploymentRequest(deployment=deployment(3, replicas=2)))
        assert placement.outcome == pb.APPLY_OUTCOME_UPDATED
        assert "PromoteModelVersion with force and a reason" in placement.message
        assert placement.rollout.rollout_id == rid3, "a placement change does not restart the rollout"
        assert placement.rollout.state == rpb.ROLLOUT_STATE_FAILED
        other = pb.Deployment(
            model_name=model, version=3, strategy=canary(rpb.CanaryStep(traffic_percent=10)), gates=GATES
        )
        err = await refused(stub.ApplyDeployment(pb.ApplyDeploymentRequest(deployment=other)))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (err.details() or "").startswith("deployment.version: version 3")
        assert "rejected" in (err.details() or "")
        err = await refused(stub.RetryRollout(pb.RetryRolloutRequest(rollout_id=rid3, reason="again")))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "rejected" in (err.details() or "")

        # Forced through with a reason (audited), a retry goes on from the gates to the traffic.
        forced = await stub.PromoteModelVersion(
            pb.PromoteModelVersionRequest(model_name=model, version=3, gates=GATES, force=True, reason="known; ship")
        )
        await wait_for(status(stub, rid3), lambda _: registry.get_version(model, 3).stage is Stage.CANDIDATE, 60.0)
        assert forced.operation.operation_id
        await stub.RetryRollout(pb.RetryRolloutRequest(rollout_id=rid3, reason="forced"))
        shipped = await wait_for(status(stub, rid3), lambda r: r.state == rpb.ROLLOUT_STATE_SUCCEEDED, 30.0)
        kinds = types(shipped)
        assert kinds.index(rpb.ROLLOUT_EVENT_TYPE_RETRIED) < len(kinds) - 1 - kinds[::-1].index(
            rpb.ROLLOUT_EVENT_TYPE_GATES_PASSED
        )
        assert registry.get_model(model).production_version == 3


async def test_a_step_completes_only_with_its_own_sample_minimum(tmp_path: Path) -> None:
    fleet, hub = LocalFleet(), LocalHub()
    async with manager(tmp_path, fleet, hub) as (mm, stub):
        assert mm.registry is not None
        model = make_model(mm.registry)
        strategy = canary(
            rpb.CanaryStep(traffic_percent=50, min_samples=300), rpb.CanaryStep(traffic_percent=80), min_samples=50
        )
        started = await stub.DeployModelVersion(
            pb.DeployModelVersionRequest(model_name=model, version=2, strategy=strategy)
        )
        rid = started.rollout.rollout_id
        assert started.rollout.strategy.canary.steps[0].min_samples == 300
        live = await wait_for(status(stub, rid), applied)
        revision = live.applied_revision
        await stub.ReportMetrics(
            pb.ReportMetricsRequest(gateway_id="g", windows=[window(model, 2, revision, {"OK": 150})])
        )
        held = await wait_for(status(stub, rid), lambda r: any(d.sample_count for d in r.analysis_results))
        guard = held.analysis_results[0]
        assert (guard.check, guard.verdict) == (rpb.ANALYSIS_CHECK_SAMPLES, rpb.ANALYSIS_VERDICT_INCONCLUSIVE)
        assert (guard.sample_count, guard.min_samples) == (150, 300)
        assert held.current_step_index == 0, "150 of 300 samples: the step holds"
        await stub.ReportMetrics(
            pb.ReportMetricsRequest(gateway_id="g", windows=[window(model, 2, revision, {"OK": 200})])
        )
        await wait_for(status(stub, rid), lambda r: r.current_step_index == 1)


async def test_blue_green_warms_up_then_waits_for_a_person_to_switch(tmp_path: Path) -> None:
    fleet, hub = LocalFleet(), LocalHub()
    async with manager(tmp_path, fleet, hub) as (mm, stub):
        assert mm.registry is not None
        model = make_model(mm.registry)
        blue_green = rpb.BlueGreenStrategy(manual_switch=True)
        blue_green.warmup.FromMilliseconds(300)
        blue_green.keep_previous_for.FromSeconds(3600)
        started = await stub.DeployModelVersion(
            pb.DeployModelVersionRequest(
                model_name=model, version=2, strategy=rpb.RolloutStrategy(blue_green=blue_green)
            )
        )
        rid = started.rollout.rollout_id
        assert started.rollout.strategy.blue_green.manual_switch
        waiting = await wait_for(status(stub, rid), lambda r: r.state == rpb.ROLLOUT_STATE_PAUSED)
        assert "is warm; resume (or promote) to switch" in waiting.message
        assert fleet.warm_endpoints(model, 2), "loaded and warm before the switch"
        assert "2" not in served_versions(hub, model), "no traffic before the switch"
        await stub.ResumeRollout(pb.ResumeRolloutRequest(rollout_id=rid, reason="switch"))
        switched = await wait_for(status(stub, rid), applied)
        assert [(t.version, t.traffic_percent) for t in switched.traffic] == [(2, 100.0)]
        assert hub.weights(model)["2"] == 10000


async def test_a_version_without_a_healthy_endpoint_past_the_grace_is_rolled_back(tmp_path: Path) -> None:
    fleet, hub = LocalFleet(), LocalHub()
    async with manager(tmp_path, fleet, hub) as (mm, stub):
        assert mm.registry is not None
        model = make_model(mm.registry)
        step = rpb.CanaryStep(traffic_percent=30)
        step.duration.FromSeconds(3600)
        policy = rpb.AutoRollbackPolicy(enabled=True, on_unhealthy=True)
        policy.unhealthy_grace.FromMilliseconds(300)
        started = await stub.DeployModelVersion(
            pb.DeployModelVersionRequest(model_name=model, version=2, strategy=canary(step), auto_rollback=policy)
        )
        rid = started.rollout.rollout_id
        assert started.rollout.auto_rollback.on_unhealthy
        await wait_for(status(stub, rid), applied)
        fleet.sick.add(2)
        fleet.changed()
        gone = await wait_for(status(stub, rid), lambda r: r.state == rpb.ROLLOUT_STATE_ROLLED_BACK)
        assert "version 2 has had no healthy endpoint" in gone.message
        assert rpb.ROLLOUT_EVENT_TYPE_UNHEALTHY in types(gone)
        assert hub.weights(model) == {"1": 10000}


def test_a_real_manager_runs_a_deployments_gates_and_serves_nothing_of_a_version_that_fails_them(
    tmp_path: Path,
) -> None:
    args = ["--data-dir", str(tmp_path / "mm"), "--port", "0", "--metrics-port", "-1"]
    process = ServiceProcess("model_manager", args).start()
    try:
        process.wait_healthy(60)
        with grpc.insecure_channel(process.address) as channel:
            stub = pb_grpc.ModelManagerServiceStub(channel)
            model = f"real-{uuid.uuid4().hex[:8]}"
            assert gate_support.upload(stub, model, b"not an onnx model") == 1
            deployment = pb.Deployment(
                model_name=model,
                version=1,
                strategy=rpb.RolloutStrategy(blue_green=rpb.BlueGreenStrategy()),
                gates=GATES,
            )
            first = stub.ApplyDeployment(pb.ApplyDeploymentRequest(deployment=deployment, reason="first"))
            operation = first.rollout.gate_operation_id
            assert f"promotion gates running as operation {operation}" in first.message
            assert gate_support.wait_done(stub, operation, 60.0).passed is False
            deadline = time.monotonic() + 60.0  # a generous bound on the controller hearing of the result
            while True:
                rollout = stub.GetRolloutStatus(pb.GetRolloutStatusRequest(model_name=model)).rollout
                if rollout.state == rpb.ROLLOUT_STATE_FAILED or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert rollout.state == rpb.ROLLOUT_STATE_FAILED, rollout
            assert [g.name for g in rollout.gate_results if not g.passed], rollout.gate_results
            assert rpb.ROLLOUT_EVENT_TYPE_GATES_FAILED in [e.type for e in rollout.events]
            assert rpb.ROLLOUT_EVENT_TYPE_VERSION_READY not in [e.type for e in rollout.events], "never loaded"
            assert not rollout.traffic, "nothing served"
            stage = stub.GetModelVersion(pb.GetModelVersionRequest(model_name=model, version=1)).model_version.stage
            assert stage == regpb.MODEL_STAGE_REJECTED
            again = stub.ApplyDeployment(pb.ApplyDeploymentRequest(deployment=deployment, reason="again"))
            assert again.outcome == pb.APPLY_OUTCOME_HELD
            assert again.rollout.gate_operation_id == operation, "no second run of the gates"
    finally:
        assert process.stop() == 0


async def test_a_version_already_validating_makes_the_rollout_wait_for_the_running_promotion(tmp_path: Path) -> None:
    fleet, hub = LocalFleet(), LocalHub()
    async with manager(tmp_path, fleet, hub) as (mm, stub):
        registry, promotions = mm.registry, mm.servicer.promotions
        assert registry is not None
        assert promotions is not None
        model = make_model(mm.registry, candidates=())
        content = b"v2 under validation"
        spec = VersionSpec(model_name=model, version=2, format="onnx", expected_sha256=artifact(content).sha256)
        registry.register_version(spec, artifact(content), "tester")
        registry.set_stage(model, 2, Stage.VALIDATING, "someone")
        # A promotion someone else started and that is still running (its gates are slow).
        running = regpb.Operation(
            operation_id="op-running", kind="promote", state=regpb.OPERATION_STATE_RUNNING, model_name=model, version=2
        )
        promotions.operations.insert(running)
        strategy = canary(rpb.CanaryStep(traffic_percent=50))
        deployment = pb.Deployment(model_name=model, version=2, strategy=strategy, gates=GATES)
        first = await stub.ApplyDeployment(pb.ApplyDeploymentRequest(deployment=deployment))
        assert first.rollout.gate_operation_id == "op-running", "no second promotion races the running one"
        rid = first.rollout.rollout_id
        await wait_for(status(stub, rid), lambda r: r.state == rpb.ROLLOUT_STATE_PENDING)
        assert (model, 2) not in fleet.placements
        # It ends: the version passed; the rollout goes on from there.
        registry.set_stage(model, 2, Stage.CANDIDATE, "someone")
        running.state, running.done, running.passed = regpb.OPERATION_STATE_SUCCEEDED, True, True
        promotions.operations.update(running)
        done = await wait_for(status(stub, rid), lambda r: r.state == rpb.ROLLOUT_STATE_SUCCEEDED)
        assert rpb.ROLLOUT_EVENT_TYPE_GATES_PASSED in types(done)
        assert fleet.placements[(model, 2)] == (1, 0)


async def test_gates_a_restart_abandoned_fail_the_rollout_and_retry_runs_them_again(tmp_path: Path) -> None:
    fleet = LocalFleet()
    async with manager(tmp_path, fleet, LocalHub()) as (mm, stub):
        registry, promotions = mm.registry, mm.servicer.promotions
        assert registry is not None
        assert promotions is not None
        model = make_model(registry, candidates=())
        content = b"v2 not loadable"
        spec = VersionSpec(model_name=model, version=2, format="onnx", expected_sha256=artifact(content).sha256)
        registry.register_version(spec, artifact(content), "tester")
        registry.set_stage(model, 2, Stage.VALIDATING, "someone")
        running = regpb.Operation(
            operation_id="op-abandoned",
            kind="promote",
            state=regpb.OPERATION_STATE_RUNNING,
            model_name=model,
            version=2,
            previous_stage=regpb.MODEL_STAGE_REGISTERED,
        )
        promotions.operations.insert(running)
        deployment = pb.Deployment(
            model_name=model, version=2, strategy=canary(rpb.CanaryStep(traffic_percent=50)), gates=GATES
        )
        rid = (await stub.ApplyDeployment(pb.ApplyDeploymentRequest(deployment=deployment))).rollout.rollout_id
        await wait_for(status(stub, rid), lambda r: r.gate_operation_id == "op-abandoned")

    async with manager(tmp_path, fleet, LocalHub()) as (mm, stub):  # the gates' run died with the manager
        assert mm.registry is not None
        failed = await wait_for(status(stub, rid), lambda r: r.state == rpb.ROLLOUT_STATE_FAILED)
        assert "manager restarted while the gates ran" in failed.message
        assert mm.registry.get_version(model, 2).stage is Stage.REGISTERED, "no verdict: the version is put back"
        assert (model, 2) not in fleet.placements
        retried = (await stub.RetryRollout(pb.RetryRolloutRequest(rollout_id=rid, reason="again"))).rollout
        assert retried.gate_operation_id not in ("", "op-abandoned"), "retry runs the gates afresh"
        assert retried.state == rpb.ROLLOUT_STATE_PENDING
        again = await wait_for(status(stub, rid), lambda r: r.state == rpb.ROLLOUT_STATE_FAILED, 60.0)
        assert rpb.ROLLOUT_EVENT_TYPE_RETRIED in types(again)
        operation = (await stub.GetOperation(pb.GetOperationRequest(operation_id=retried.gate_operation_id))).operation
        assert operation.done
        assert operation.model_name == model
        assert (model, 2) not in fleet.placements, "unloadable bytes fail their gates: still nothing loaded"
