"""ApplyDeployment: idempotent, guarded by its generation, refusing unknown and invalid fields by name, listing what
a dry run would change, and after an abort holding the same spec ("rolled back at generation N") until a retry."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import rollout_pb2 as rpb
from model_manager.lifecycle import Stage
from tests.model_manager.rollout_support import LocalFleet, LocalHub, canary, make_model, manager, status, wait_for


def deployment(model: str, version: int = 2, **fields: object) -> pb.Deployment:
    strategy = canary(rpb.CanaryStep(traffic_percent=25, pause=True))
    return pb.Deployment(model_name=model, version=version, strategy=strategy, **fields)  # type: ignore[arg-type]


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value


async def test_apply_is_idempotent_guarded_and_holds_after_an_abort_until_retry(tmp_path: Path) -> None:
    async with manager(tmp_path, LocalFleet(), LocalHub()) as (mm, stub):
        assert mm.registry is not None
        model = make_model(mm.registry)

        dry = await stub.ApplyDeployment(pb.ApplyDeploymentRequest(deployment=deployment(model), dry_run=True))
        assert dry.outcome == pb.APPLY_OUTCOME_CREATED
        assert list(dry.changes) == [f"create deployment of {model} at version 2"]
        assert (await refused(stub.GetDeployment(pb.GetDeploymentRequest(model_name=model)))).code() == (
            grpc.StatusCode.NOT_FOUND
        ), "a dry run changes nothing"

        created = await stub.ApplyDeployment(
            pb.ApplyDeploymentRequest(deployment=deployment(model, aliases={"champion": 2}), reason="v2")
        )
        assert created.outcome == pb.APPLY_OUTCOME_CREATED
        assert created.deployment.generation == 1
        assert created.deployment.updated_by == "anonymous"
        rid = created.rollout.rollout_id
        assert created.deployment.rollout_id == rid
        assert created.rollout.generation == 1
        assert mm.registry.get_model(model).aliases == {"champion": 2}

        same = await stub.ApplyDeployment(
            pb.ApplyDeploymentRequest(deployment=deployment(model, aliases={"champion": 2}))
        )
        assert same.outcome == pb.APPLY_OUTCOME_UNCHANGED
        assert same.deployment.generation == 1

        stale = await refused(
            stub.ApplyDeployment(pb.ApplyDeploymentRequest(deployment=deployment(model), expected_generation=5))
        )
        assert stale.code() == grpc.StatusCode.ABORTED
        assert "expected_generation" in (stale.details() or "")

        diff = await stub.ApplyDeployment(
            pb.ApplyDeploymentRequest(deployment=deployment(model, replicas=3), dry_run=True, expected_generation=1)
        )
        assert "replicas: 0 -> 3" in diff.changes
        assert "aliases: {'champion': 2} -> {}" in diff.changes

        await wait_for(status(stub, rid), lambda r: r.state == rpb.ROLLOUT_STATE_PAUSED)
        await stub.AbortRollout(pb.AbortRolloutRequest(rollout_id=rid, reason="bad canary"))
        await wait_for(status(stub, rid), lambda r: r.state == rpb.ROLLOUT_STATE_ROLLED_BACK)
        held = await stub.ApplyDeployment(
            pb.ApplyDeploymentRequest(deployment=deployment(model, aliases={"champion": 2}))
        )
        assert held.outcome == pb.APPLY_OUTCOME_HELD
        assert held.message.startswith("rolled back at generation 1: bad canary")
        assert held.rollout.state == rpb.ROLLOUT_STATE_ROLLED_BACK, "the same spec never restarts it"

        retried = (await stub.RetryRollout(pb.RetryRolloutRequest(rollout_id=rid, reason="fixed"))).rollout
        assert retried.attempt == 2
        assert retried.state in (rpb.ROLLOUT_STATE_PENDING, rpb.ROLLOUT_STATE_PROGRESSING)
        again = await stub.ApplyDeployment(
            pb.ApplyDeploymentRequest(deployment=deployment(model, aliases={"champion": 2}))
        )
        assert again.outcome == pb.APPLY_OUTCOME_UNCHANGED
        listed = await stub.ListDeployments(pb.ListDeploymentsRequest())
        assert [d.model_name for d in listed.deployments] == [model]


async def test_apply_refuses_unknown_and_invalid_fields_by_name(tmp_path: Path) -> None:
    async with manager(tmp_path, LocalFleet(), LocalHub()) as (mm, stub):
        assert mm.registry is not None
        model = make_model(mm.registry)
        # A field a newer client knows and this server does not: field 99 of Deployment, a varint.
        unknown = pb.Deployment.FromString(deployment(model).SerializeToString() + b"\x98\x06\x01")
        err = await refused(stub.ApplyDeployment(pb.ApplyDeploymentRequest(deployment=unknown)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "deployment: unknown field number 99" in (err.details() or "")

        cases = {
            "deployment.version": deployment(model, version=0),
            "deployment.strategy": pb.Deployment(model_name=model, version=2),
            "deployment.strategy.canary.steps[0].weight": pb.Deployment(
                model_name=model, version=2, strategy=canary(rpb.CanaryStep(traffic_percent=150))
            ),
            "deployment.replicas": deployment(model, replicas=-1),
            "deployment.strategy.blue_green.warmup_requests": pb.Deployment(
                model_name=model,
                version=2,
                strategy=rpb.RolloutStrategy(blue_green=rpb.BlueGreenStrategy(warmup_requests=100)),
            ),
            "deployment.strategy.canary.steps[0].min_samples": pb.Deployment(
                model_name=model, version=2, strategy=canary(rpb.CanaryStep(traffic_percent=10, min_samples=-1))
            ),
        }
        for name, bad in cases.items():
            err = await refused(stub.ApplyDeployment(pb.ApplyDeploymentRequest(deployment=bad)))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert (err.details() or "").startswith(name), (name, err.details())
        err = await refused(stub.ApplyDeployment(pb.ApplyDeploymentRequest(deployment=deployment(model, version=9))))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert "version" in (err.details() or "")


async def test_apply_refuses_a_fallback_version_that_could_never_serve(tmp_path: Path) -> None:
    async with manager(tmp_path, LocalFleet(), LocalHub()) as (mm, stub):
        assert mm.registry is not None
        model = make_model(mm.registry, candidates=(2, 3))
        mm.registry.set_stage(model, 3, Stage.REJECTED, "tester")
        cases = {
            "negative": (-1, grpc.StatusCode.INVALID_ARGUMENT, "expected a version number 0 or more"),
            "the deployed version": (2, grpc.StatusCode.INVALID_ARGUMENT, "other than the deployed version 2"),
            "missing": (9, grpc.StatusCode.FAILED_PRECONDITION, "it has no version 9"),
            "rejected": (3, grpc.StatusCode.FAILED_PRECONDITION, "rejected by its gates"),
        }
        for name, (fallback, code, said) in cases.items():
            for dry_run in (True, False):
                request = pb.ApplyDeploymentRequest(
                    deployment=deployment(model, fallback_version=fallback), dry_run=dry_run
                )
                err = await refused(stub.ApplyDeployment(request))
                assert err.code() == code, (name, dry_run)
                details = err.details() or ""
                assert details.startswith("deployment.fallback_version: "), (name, details)
                assert said in details, (name, details)
        assert (await refused(stub.GetDeployment(pb.GetDeploymentRequest(model_name=model)))).code() == (
            grpc.StatusCode.NOT_FOUND
        ), "nothing refused was stored"

        created = await stub.ApplyDeployment(
            pb.ApplyDeploymentRequest(deployment=deployment(model, fallback_version=1))
        )
        assert created.outcome == pb.APPLY_OUTCOME_CREATED
        assert created.deployment.fallback_version == 1
