"""What goes into each model's route beyond its weights, through the model manager's RPCs in process: the fallback
(configured on the model or the deployment, the rollout's baseline, the previous production while warm), the static
answer, and the score bins that make the PSI check work on reported windows."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from grpc import aio

from chassis.auth import Role, token_line
from fresco.api.common.v1 import values_pb2
from fresco.api.features.v1 import statistics_pb2 as spb
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import registry_pb2 as regpb
from fresco.api.models.v1 import rollout_pb2 as rpb
from fresco.api.models.v1 import routing_pb2 as rtpb
from model_manager.lifecycle import Stage
from model_manager.records import ModelSpec, VersionSpec
from model_manager.registry import Registry
from model_manager.routes import ModelRoute
from tests.model_manager.registry_support import artifact, signature
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

BOUNDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TRAINED = (100,) * 10  # the training scores spread evenly over the ten bins
SHIFTED = (0, 0, 0, 0, 0, 0, 0, 50, 150, 800)  # nearly every score above 0.8


async def route_where(
    hub: LocalHub, model: str, holds: Callable[[ModelRoute], bool], within_s: float = 20.0
) -> ModelRoute:
    """The model's route in the hub's table once `holds` is true of it."""
    deadline = time.monotonic() + within_s
    while True:
        route = next((r for r in hub.table.routes if r.model == model), None)
        if route is not None and holds(route):
            return route
        if time.monotonic() > deadline:
            raise AssertionError(f"the route never got there; last: {route}")
        await asyncio.sleep(0.02)


def mask(*paths: str) -> FieldMask:
    return FieldMask(paths=list(paths))


def scored_model(registry: Registry, versions: int = 2) -> str:
    """A model whose versions carry the training histogram of their score output; version 1 in production."""
    name = f"s-{uuid.uuid4().hex[:8]}"
    registry.create_model(ModelSpec(name=name, owner="risk", signature=signature()), "tester")
    stats = spb.FeatureStatistics(
        feature_name="probability",
        count=sum(TRAINED),
        numeric=spb.NumericStatistics(histogram=spb.Histogram(bucket_bounds=BOUNDS, bucket_counts=TRAINED)),
    )
    for v in range(1, versions + 1):
        content = f"{name}-{v}".encode()
        spec = VersionSpec(
            model_name=name,
            version=v,
            format="onnx",
            expected_sha256=artifact(content).sha256,
            signature=signature(),
            training_statistics=(stats,),
        )
        registry.register_version(spec, artifact(content), "tester")
        for stage in (Stage.VALIDATING, Stage.CANDIDATE):
            registry.set_stage(name, v, stage, "tester")
    registry.set_stage(name, 1, Stage.PRODUCTION, "tester")
    return name


def scores(counts: tuple[int, ...]) -> rtpb.ScoreHistogram:
    return rtpb.ScoreHistogram(
        output_name="probability", histogram=spb.Histogram(bucket_bounds=BOUNDS, bucket_counts=counts)
    )


async def test_update_model_sets_the_fallback_and_static_answer_that_routes_carry(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(token_line("ops-bot", Role.DEPLOYER, "ops-secret") + "\n")
    fleet, hub = LocalFleet(), LocalHub()
    async with manager(tmp_path / "data", fleet, hub, auth_tokens_file=tokens) as (mm, stub):
        assert mm.registry is not None
        model = make_model(mm.registry, candidates=(2, 3))
        plain = await route_where(hub, model, lambda r: bool(r.versions))
        assert (plain.fallback, plain.static_answer) == ("", ()), "nothing configured, no rollout: no fallback"
        static = regpb.StaticFallback(
            outputs={"probability": values_pb2.Value(double_list=values_pb2.DoubleList(values=[0.5, 0.5]))}
        )
        request = pb.UpdateModelRequest(
            model=regpb.Model(name=model, fallback_version=3, static_fallback=static),
            update_mask=mask("fallback_version", "static_fallback"),
            reason="answer something when v1 fails",
        )
        deployer = (("authorization", "Bearer ops-secret"),)
        with pytest.raises(aio.AioRpcError) as refused:
            await stub.UpdateModel(request)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        updated = (await stub.UpdateModel(request, metadata=deployer)).model
        assert updated.fallback_version == 3
        assert updated.static_fallback == static
        assert (await stub.GetModel(pb.GetModelRequest(name=model))).model.static_fallback == static

        route = await route_where(hub, model, lambda r: r.fallback == "3")
        assert route.static_answer == (("probability", (0.5, 0.5)),)
        assert {v.version: v.weight for v in route.versions} == {"1": 10000, "3": 0}, "the fallback takes no share"
        assert fleet.warm_endpoints(model, 3), "a configured fallback is loaded and kept warm"
        assert {(model, 1), (model, 3)} <= fleet.retained

        audit = await stub.ListAuditRecords(pb.ListAuditRecordsRequest(model_name=model))
        change = next(a for a in audit.records if a.action == "model.update")
        assert change.identity == "ops-bot"
        assert change.reason == "answer something when v1 fails"
        assert change.details["fallback_version"] == "3"

        cleared = pb.UpdateModelRequest(
            model=regpb.Model(name=model), update_mask=mask("fallback_version", "static_fallback")
        )
        await stub.UpdateModel(cleared, metadata=deployer)
        route = await route_where(hub, model, lambda r: r.fallback == "")
        assert route.static_answer == ()
        assert (model, 3) not in fleet.retained


@pytest.mark.parametrize(
    ("model_fields", "paths", "code", "named"),
    [
        ({}, (), grpc.StatusCode.INVALID_ARGUMENT, "update_mask"),
        ({}, ("name",), grpc.StatusCode.INVALID_ARGUMENT, "update_mask"),
        ({"fallback_version": 99}, ("fallback_version",), grpc.StatusCode.NOT_FOUND, "model.fallback_version"),
        ({"fallback_version": -2}, ("fallback_version",), grpc.StatusCode.INVALID_ARGUMENT, "model.fallback_version"),
        (
            {"static_fallback": regpb.StaticFallback(outputs={"label": values_pb2.Value(int64_value=1)})},
            ("static_fallback",),
            grpc.StatusCode.INVALID_ARGUMENT,
            "model.static_fallback.outputs[label]",
        ),
        (
            {"static_fallback": regpb.StaticFallback(outputs={"probability": values_pb2.Value()})},
            ("static_fallback",),
            grpc.StatusCode.INVALID_ARGUMENT,
            "model.static_fallback.outputs[probability]",
        ),
    ],
)
async def test_bad_updates_name_the_field(
    tmp_path: Path, model_fields: dict[str, object], paths: tuple[str, ...], code: grpc.StatusCode, named: str
) -> None:
    async with manager(tmp_path, LocalFleet(), LocalHub()) as (mm, stub):
        assert mm.registry is not None
        model = make_model(mm.registry)
        request = pb.UpdateModelRequest(model=regpb.Model(name=model, **model_fields))  # type: ignore[arg-type]
        if paths:
            request.update_mask.CopyFrom(mask(*paths))
        with pytest.raises(aio.AioRpcError) as err:
            await stub.UpdateModel(request)
        assert err.value.code() == code
        assert named in (err.value.details() or "")
        assert mm.registry.get_model(model).fallback_version == 0, "nothing changed"


async def test_create_model_takes_a_static_answer_but_no_fallback_version(tmp_path: Path) -> None:
    async with manager(tmp_path, LocalFleet(), LocalHub()) as (_mm, stub):
        static = regpb.StaticFallback(
            outputs={"probability": values_pb2.Value(double_list=values_pb2.DoubleList(values=[1, 0]))}
        )
        made = await stub.CreateModel(
            pb.CreateModelRequest(model=regpb.Model(name="with-answer", signature=signature(), static_fallback=static))
        )
        assert made.model.static_fallback == static
        with pytest.raises(aio.AioRpcError) as err:
            await stub.CreateModel(
                pb.CreateModelRequest(model=regpb.Model(name="too-early", signature=signature(), fallback_version=1))
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "model.fallback_version" in (err.value.details() or "")


async def test_a_canary_falls_back_to_its_baseline_unless_the_deployment_names_a_fallback(tmp_path: Path) -> None:
    fleet, hub = LocalFleet(), LocalHub()
    async with manager(tmp_path, fleet, hub) as (mm, stub):
        assert mm.registry is not None
        model = make_model(mm.registry, candidates=(2, 3))
        strategy = canary(rpb.CanaryStep(traffic_percent=10, pause=True))
        deployment = pb.Deployment(model_name=model, version=2, strategy=strategy)
        rid = (await stub.ApplyDeployment(pb.ApplyDeploymentRequest(deployment=deployment))).rollout.rollout_id
        await wait_for(status(stub, rid), applied)
        route = await route_where(hub, model, lambda r: r.active_rollout_id == rid)
        assert route.fallback == "1", "the baseline serves when the canary fails"

        deployment.fallback_version = 3
        await stub.ApplyDeployment(pb.ApplyDeploymentRequest(deployment=deployment, expected_generation=1))
        route = await route_where(hub, model, lambda r: r.fallback == "3")
        assert fleet.warm_endpoints(model, 3)


async def test_after_blue_green_the_previous_version_is_the_fallback_while_it_is_kept(tmp_path: Path) -> None:
    fleet, hub = LocalFleet(), LocalHub()
    async with manager(tmp_path, fleet, hub) as (mm, stub):
        assert mm.registry is not None
        model = make_model(mm.registry)
        blue_green = rpb.BlueGreenStrategy()
        blue_green.keep_previous_for.FromNanoseconds(int(1.5e9))
        strategy = rpb.RolloutStrategy(blue_green=blue_green)
        await stub.DeployModelVersion(pb.DeployModelVersionRequest(model_name=model, version=2, strategy=strategy))
        switched = await route_where(
            hub, model, lambda r: {v.version: v.weight for v in r.versions}.get("2") == r.total_weight
        )
        assert switched.fallback == "1", "the previous version, still warm, answers when the new one fails"
        assert switched.version("1").weight == 0
        # Once the window ends the previous version is unloaded, and the route no longer falls back to it.
        gone = await route_where(hub, model, lambda r: r.fallback == "" and (model, 1) in fleet.released)
        assert [v.version for v in gone.versions] == ["2"]
        assert mm.registry.get_model(model).production_version == 2


@pytest.mark.parametrize(("candidate_scores", "passes"), [(TRAINED, True), (SHIFTED, False)])
async def test_score_psi_judges_a_canary_on_reported_windows_over_the_training_bins(
    tmp_path: Path, candidate_scores: tuple[int, ...], passes: bool
) -> None:
    fleet, hub = LocalFleet(), LocalHub()
    async with manager(tmp_path, fleet, hub) as (mm, stub):
        assert mm.registry is not None
        model = scored_model(mm.registry)
        idle = await route_where(hub, model, lambda r: bool(r.versions))
        assert (idle.score_output, idle.score_bounds) == ("probability", BOUNDS), "bins from the training histogram"
        strategy = canary(rpb.CanaryStep(traffic_percent=50), max_prediction_psi=0.1, min_samples=100, interval_s=0.2)
        rid = (
            await stub.DeployModelVersion(pb.DeployModelVersionRequest(model_name=model, version=2, strategy=strategy))
        ).rollout.rollout_id
        await wait_for(status(stub, rid), applied)
        route = hub.table.route(model)
        assert (route.score_output, route.score_bounds) == ("probability", BOUNDS)
        finished = (rpb.ROLLOUT_STATE_SUCCEEDED, rpb.ROLLOUT_STATE_ROLLED_BACK)
        reported: set[int] = set()

        def judged(r: rpb.Rollout) -> bool:
            return r.state in finished or r.applied_revision not in reported

        while True:  # each applied step is judged on windows of its own route revision
            now = await wait_for(status(stub, rid), judged)
            if now.state in finished:
                break
            rev = now.applied_revision
            cand, base = window(model, 2, rev, {"OK": 1000}), window(model, 1, rev, {"OK": 1000})
            cand.score_histograms.append(scores(candidate_scores))
            base.score_histograms.append(scores(TRAINED))
            report = await stub.ReportMetrics(pb.ReportMetricsRequest(gateway_id="gw-1", windows=[cand, base]))
            assert report.accepted_windows == 2
            reported.add(rev)

        if passes:
            done = await wait_for(status(stub, rid), lambda r: r.state == rpb.ROLLOUT_STATE_SUCCEEDED)
            checks = [d for e in done.events for d in e.decisions if d.check == rpb.ANALYSIS_CHECK_PREDICTION_PSI]
            assert checks
            assert all(d.verdict == rpb.ANALYSIS_VERDICT_PASSED for d in checks)
            return
        done = await wait_for(status(stub, rid), lambda r: r.state == rpb.ROLLOUT_STATE_ROLLED_BACK)
        failed = [e for e in done.events if e.type == rpb.ROLLOUT_EVENT_TYPE_ANALYSIS_FAILED]
        assert failed, done.events
        psi = next(d for d in failed[0].decisions if d.check == rpb.ANALYSIS_CHECK_PREDICTION_PSI)
        assert psi.verdict == rpb.ANALYSIS_VERDICT_FAILED
        assert psi.measured_value > psi.threshold >= 0.1
        assert psi.sample_count == 1000
        assert hub.weights(model) == {"1": 10000}


async def test_update_model_changes_only_the_masked_fields(tmp_path: Path) -> None:
    async with manager(tmp_path, LocalFleet(), LocalHub()) as (mm, stub):
        assert mm.registry is not None
        model = make_model(mm.registry)
        new = regpb.Model(name=model, description="scores churn", owner="someone-else", labels={"team": "growth"})
        updated = (
            await stub.UpdateModel(pb.UpdateModelRequest(model=new, update_mask=mask("description", "labels")))
        ).model
        assert (updated.description, dict(updated.labels)) == ("scores churn", {"team": "growth"})
        assert updated.owner == "risk", "owner is not in the mask"
        assert updated.production_version == 1
