"""The rollout runtime through the model manager's RPCs, in process on SQLite: canaries judged on reported windows,
rollbacks with their reasons, holds on too little traffic, verbs, watches, and a restart mid-rollout."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from chassis.auth import Role, token_line
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import rollout_pb2 as rpb
from model_manager.envoy_resources import CLUSTER
from model_manager.lifecycle import Stage
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


async def next_update(watch: object) -> pb.WatchRolloutResponse:
    """The next message of a WatchRollout stream."""
    message = await watch.read()  # type: ignore[attr-defined]
    assert isinstance(message, pb.WatchRolloutResponse), message
    return message


def step(percent: float, *, dwell_s: float = 0.0, pause: bool = False) -> rpb.CanaryStep:
    s = rpb.CanaryStep(traffic_percent=percent, pause=pause)
    s.duration.FromNanoseconds(int(dwell_s * 1e9))
    return s


async def test_erroring_canary_rolls_back_on_its_own_with_the_reason(tmp_path: Path) -> None:
    fleet, hub = LocalFleet(), LocalHub()
    async with manager(tmp_path, fleet, hub) as (mm, stub):
        assert mm.registry is not None
        model = make_model(mm.registry)
        strategy = canary(step(10, dwell_s=60), max_error_rate=0.05, min_samples=100)
        deployed = await stub.DeployModelVersion(
            pb.DeployModelVersionRequest(model_name=model, version=2, strategy=strategy, reason="nightly")
        )
        rid = deployed.rollout.rollout_id
        assert deployed.rollout.baseline_version == 1
        live = await wait_for(status(stub, rid), applied)
        assert hub.weights(model) == {"1": 9000, "2": 1000}, "baseline first, weights in basis points"
        assert mm.ads.revision == hub.table.revision, "the xDS server publishes the same table"
        rev = live.applied_revision
        report = pb.ReportMetricsRequest(
            gateway_id="gw-1",
            windows=[window(model, 2, rev, {"OK": 300, "INTERNAL": 100}), window(model, 1, rev, {"OK": 3000})],
        )
        assert (await stub.ReportMetrics(report)).accepted_windows == 2

        done = await wait_for(status(stub, rid), lambda r: r.state == rpb.ROLLOUT_STATE_ROLLED_BACK)
        assert hub.weights(model) == {"1": 10000}
        failed = [e for e in done.events if e.type == rpb.ROLLOUT_EVENT_TYPE_ANALYSIS_FAILED]
        assert failed, done.events
        reason = next(d for d in failed[0].decisions if d.check == rpb.ANALYSIS_CHECK_ERROR_RATE)
        assert reason.verdict == rpb.ANALYSIS_VERDICT_FAILED
        assert reason.measured_value == pytest.approx(0.25)
        assert reason.threshold == pytest.approx(0.05)
        assert reason.sample_count == 400
        assert reason.window_end.seconds > 0
        assert "rolled back at generation" in done.message
        # The same decision, as data, in the audit log under the controller's identity.
        audit = await stub.ListAuditRecords(pb.ListAuditRecordsRequest(model_name=model))
        started = [a for a in audit.records if a.action == "rollout.rollback_started"]
        assert started
        assert started[0].identity == "system:rollout-controller"
        decisions = json.loads(started[0].details["decisions"])
        assert any(d["check"] == "error_rate" and d["samples"] == 400 for d in decisions)
        assert mm.registry.get_model(model).production_version == 1
        await wait_for(status(stub, rid), lambda r: not r.traffic or (model, 2) in fleet.released)
        assert (model, 2) in fleet.released, "the rolled-back version is unloaded"


async def test_low_traffic_holds_inconclusive_then_pauses_with_counts_and_never_rolls_back(tmp_path: Path) -> None:
    fleet, hub = LocalFleet(), LocalHub()
    async with manager(tmp_path, fleet, hub) as (mm, stub):
        assert mm.registry is not None
        model = make_model(mm.registry)
        limit = rpb.AnalysisThresholds(max_error_rate=0.05, min_samples=500)
        limit.inconclusive_limit.FromNanoseconds(int(1.5e9))
        strategy = canary(step(10, dwell_s=0.5))
        strategy.canary.analysis.CopyFrom(limit)
        rid = (
            await stub.DeployModelVersion(pb.DeployModelVersionRequest(model_name=model, version=2, strategy=strategy))
        ).rollout.rollout_id
        rev = (await wait_for(status(stub, rid), applied)).applied_revision
        # Few requests, every one of them a server error: too few to judge, so no rollback.
        await stub.ReportMetrics(
            pb.ReportMetricsRequest(
                gateway_id="gw-1",
                windows=[window(model, 2, rev, {"OK": 30, "UNAVAILABLE": 7}), window(model, 1, rev, {"OK": 300})],
            )
        )
        held = await wait_for(status(stub, rid), lambda r: r.state == rpb.ROLLOUT_STATE_PAUSED)
        assert "INCONCLUSIVE" in held.message
        assert "37/500 samples" in held.message
        guard = next(a for a in held.analysis_results if a.check == rpb.ANALYSIS_CHECK_SAMPLES)
        assert (guard.sample_count, guard.min_samples) == (37, 500)
        kinds = {e.type for e in held.events}
        assert rpb.ROLLOUT_EVENT_TYPE_ROLLED_BACK not in kinds
        assert rpb.ROLLOUT_EVENT_TYPE_ANALYSIS_FAILED not in kinds
        assert hub.weights(model) == {"1": 9000, "2": 1000}, "the step's weights are held"


async def test_client_errors_do_not_count_against_a_canary(tmp_path: Path) -> None:
    fleet, hub = LocalFleet(), LocalHub()
    async with manager(tmp_path, fleet, hub) as (mm, stub):
        assert mm.registry is not None
        model = make_model(mm.registry)
        strategy = canary(step(50), max_error_rate=0.05, min_samples=100)
        rid = (
            await stub.DeployModelVersion(pb.DeployModelVersionRequest(model_name=model, version=2, strategy=strategy))
        ).rollout.rollout_id
        seen: set[int] = set()
        # Each step (50%, then full) is judged on windows under its own revision: report them as each is applied.
        for _ in range(2):
            r = await wait_for(status(stub, rid), lambda r: applied(r) and r.applied_revision not in seen)
            seen.add(r.applied_revision)
            windows = [window(model, 2, r.applied_revision, {"OK": 400, "INVALID_ARGUMENT": 300})]
            windows.append(window(model, 1, r.applied_revision, {"OK": 400}))
            await stub.ReportMetrics(pb.ReportMetricsRequest(gateway_id="gw-1", windows=windows))
            if len(seen) == 1:
                await wait_for(status(stub, rid), lambda r: r.published_revision not in seen)
        done = await wait_for(status(stub, rid), lambda r: r.state == rpb.ROLLOUT_STATE_SUCCEEDED)
        rate = next(
            d for d in done.events[-1].decisions or done.analysis_results if d.check == rpb.ANALYSIS_CHECK_ERROR_RATE
        )
        assert rate.measured_value == 0.0, "300 INVALID_ARGUMENT are not judged"
        assert rate.sample_count == 400
        assert mm.registry.get_model(model).production_version == 2
        assert mm.registry.get_version(model, 1).stage is Stage.ARCHIVED
        await wait_for(status(stub, rid), lambda r: hub.weights(model) == {"2": 10000})


async def test_verbs_pause_resume_promote_then_undo_and_watch(tmp_path: Path) -> None:
    fleet, hub = LocalFleet(), LocalHub()
    async with manager(tmp_path, fleet, hub) as (mm, stub):
        assert mm.registry is not None
        model = make_model(mm.registry)
        strategy = canary(step(20, dwell_s=3600), step(60, dwell_s=3600))
        rid = (
            await stub.DeployModelVersion(pb.DeployModelVersionRequest(model_name=model, version=2, strategy=strategy))
        ).rollout.rollout_id
        watch = stub.WatchRollout(pb.WatchRolloutRequest(rollout_id=rid))
        first = await next_update(watch)
        assert first.revision >= 1
        assert first.new_events[0].type == rpb.ROLLOUT_EVENT_TYPE_CREATED
        await wait_for(status(stub, rid), applied)

        paused = (await stub.PauseRollout(pb.PauseRolloutRequest(rollout_id=rid, reason="look"))).rollout
        assert paused.state == rpb.ROLLOUT_STATE_PAUSED
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.PauseRollout(pb.PauseRolloutRequest(rollout_id=rid))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        await stub.ResumeRollout(pb.ResumeRolloutRequest(rollout_id=rid, reason="fine"))
        skipped = (await stub.PromoteRollout(pb.PromoteRolloutRequest(rollout_id=rid, reason="skip"))).rollout
        assert skipped.current_step_index == 1
        await wait_for(status(stub, rid), lambda r: applied(r) and r.current_step_index == 1)
        assert hub.weights(model) == {"1": 4000, "2": 6000}
        await stub.PromoteRollout(pb.PromoteRolloutRequest(rollout_id=rid, reason="ship", full=True))
        await wait_for(status(stub, rid), lambda r: r.state == rpb.ROLLOUT_STATE_SUCCEEDED)
        assert mm.registry.get_model(model).production_version == 2

        undone = (await stub.UndoRollout(pb.UndoRolloutRequest(rollout_id=rid, reason="regret"))).rollout
        assert undone.state == rpb.ROLLOUT_STATE_ROLLING_BACK
        await wait_for(status(stub, rid), lambda r: r.state == rpb.ROLLOUT_STATE_ROLLED_BACK)
        assert hub.weights(model) == {"1": 10000}
        assert mm.registry.get_model(model).production_version == 1

        # The watch saw every change in order, each with a larger revision; the actors are the caller's identity.
        revisions, kinds, actors, messages = [first.revision], [], set(), [first]
        while True:
            msg = await next_update(watch)
            messages.append(msg)
            revisions.append(msg.revision)
            kinds += [e.type for e in msg.new_events]
            actors |= {e.actor for e in msg.new_events if e.type == rpb.ROLLOUT_EVENT_TYPE_PAUSED}
            if msg.rollout.state == rpb.ROLLOUT_STATE_ROLLED_BACK:
                break
        watch.cancel()
        assert revisions == sorted(set(revisions))
        assert rpb.ROLLOUT_EVENT_TYPE_RESUMED in kinds
        assert rpb.ROLLOUT_EVENT_TYPE_ROLLED_BACK in kinds
        assert actors == {"anonymous"}
        # A watch resumed after a revision starts with the status as it is now, which is later than that revision,
        # and with only the events stored after it.
        seen = [e for m in messages for e in m.new_events]
        assert seen == list(messages[-1].rollout.events), "the watch sent every event once, in order"
        for after in (revisions[-2], first.revision, 0):
            resumed = stub.WatchRollout(pb.WatchRolloutRequest(rollout_id=rid, resume_after_revision=after))
            again = await next_update(resumed)
            resumed.cancel()
            assert again.revision >= revisions[-1]
            expected = [e for m in messages if m.revision > after for e in m.new_events]
            assert list(again.new_events) == expected, f"resumed after revision {after}"
        assert 0 < len(messages[-1].new_events) < len(messages[-1].rollout.events)
        listed = await stub.ListRollouts(
            pb.ListRolloutsRequest(model_name=model, states=[rpb.ROLLOUT_STATE_ROLLED_BACK])
        )
        assert [r.rollout_id for r in listed.rollouts] == [rid]


async def test_the_managers_xds_server_publishes_the_rollouts_table_and_nacks_show_in_its_status(
    tmp_path: Path,
) -> None:
    fleet, hub = LocalFleet(), LocalHub()
    async with manager(tmp_path, fleet, hub) as (mm, stub):
        assert mm.registry is not None
        model = make_model(mm.registry)
        strategy = canary(rpb.CanaryStep(traffic_percent=10, pause=True))
        rid = (
            await stub.DeployModelVersion(pb.DeployModelVersionRequest(model_name=model, version=2, strategy=strategy))
        ).rollout.rollout_id
        await wait_for(status(stub, rid), lambda r: r.state == rpb.ROLLOUT_STATE_PAUSED)
        async with grpc.aio.insecure_channel(mm.app.address) as channel:
            ads = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
            request = discovery_pb2.DiscoveryRequest(type_url=CLUSTER)
            request.node.id = "envoy-7"
            await ads.write(request)
            clusters = await asyncio.wait_for(ads.read(), 30)
            assert clusters.version_info == str(hub.table.revision), "the same table as the gateways'"
            assert len(clusters.resources) == 2, "one cluster per version of the canary"
            nack = discovery_pb2.DiscoveryRequest(type_url=CLUSTER, response_nonce=clusters.nonce, version_info="")
            nack.node.id = "envoy-7"
            nack.error_detail.message = "cluster rejected"
            await ads.write(nack)
            shown = await wait_for(status(stub, rid), lambda r: len(r.xds_nacks) > 0)
            ads.cancel()
        [seen] = shown.xds_nacks
        assert (seen.node_id, seen.type_url, seen.error) == ("envoy-7", CLUSTER, "cluster rejected")
        assert seen.version_info == str(hub.table.revision)


async def test_a_version_that_cannot_load_fails_the_rollout_before_any_traffic(tmp_path: Path) -> None:
    fleet, hub = LocalFleet(refuse={2}), LocalHub()
    async with manager(tmp_path, fleet, hub) as (mm, stub):
        assert mm.registry is not None
        model = make_model(mm.registry)
        strategy = canary(rpb.CanaryStep(traffic_percent=10))
        rid = (
            await stub.DeployModelVersion(pb.DeployModelVersionRequest(model_name=model, version=2, strategy=strategy))
        ).rollout.rollout_id
        failed = await wait_for(status(stub, rid), lambda r: r.state == rpb.ROLLOUT_STATE_FAILED)
        assert "no predictor has room" in failed.message
        assert all([v.version for v in t.route(model).versions] == ["1"] for t in hub.published), "no traffic to v2"
        with pytest.raises(grpc.aio.AioRpcError) as busy:
            await stub.DeployModelVersion(pb.DeployModelVersionRequest(model_name=model, version=1, strategy=strategy))
        assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION, "version 1 is already in production"


async def test_blue_green_switches_keeping_the_old_version_as_fallback_and_shadow_mirrors(tmp_path: Path) -> None:
    fleet, hub = LocalFleet(), LocalHub()
    async with manager(tmp_path, fleet, hub) as (mm, stub):
        assert mm.registry is not None
        model = make_model(mm.registry)
        blue_green = rpb.BlueGreenStrategy()
        blue_green.keep_previous_for.FromSeconds(3600)
        rid = (
            await stub.DeployModelVersion(
                pb.DeployModelVersionRequest(
                    model_name=model, version=2, strategy=rpb.RolloutStrategy(blue_green=blue_green)
                )
            )
        ).rollout.rollout_id
        switched = await wait_for(status(stub, rid), applied)
        assert [(t.version, t.traffic_percent) for t in switched.traffic] == [(2, 100.0)]
        route = hub.table.route(model)
        assert hub.weights(model) == {"1": 0, "2": 10000}
        assert route.fallback == "1", "the old version stays warm, as the fallback, for an instant rollback"
        await stub.AbortRollout(pb.AbortRolloutRequest(rollout_id=rid, reason="switch back"))
        await wait_for(status(stub, rid), lambda r: r.state == rpb.ROLLOUT_STATE_ROLLED_BACK)
        assert hub.weights(model) == {"1": 10000}

        other = make_model(mm.registry)
        shadow = rpb.ShadowStrategy(mirror_percent=20)
        shadow.duration.FromSeconds(3600)
        sid = (
            await stub.DeployModelVersion(
                pb.DeployModelVersionRequest(model_name=other, version=2, strategy=rpb.RolloutStrategy(shadow=shadow))
            )
        ).rollout.rollout_id
        await wait_for(status(stub, sid), applied)
        mirrored = hub.table.route(other)
        assert hub.weights(other) == {"1": 10000, "2": 0}
        assert mirrored.shadow is not None
        assert mirrored.shadow.version == "2"
        assert mirrored.shadow.share == pytest.approx(0.2)
        assert mirrored.split_seed == f"split:{other}"


async def test_verbs_need_a_deployer_and_the_audit_records_its_identity(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(
        token_line("ci-bot", Role.DEPLOYER, "deploy-secret")
        + "\n"
        + token_line("dash", Role.VIEWER, "view-secret")
        + "\n"
    )
    as_deployer = (("authorization", "Bearer deploy-secret"),)
    async with manager(tmp_path / "data", LocalFleet(), LocalHub(), auth_tokens_file=tokens) as (mm, stub):
        assert mm.registry is not None
        model = make_model(mm.registry)
        strategy = canary(rpb.CanaryStep(traffic_percent=10, pause=True))
        request = pb.DeployModelVersionRequest(model_name=model, version=2, strategy=strategy)
        for metadata, code in [
            ((), grpc.StatusCode.UNAUTHENTICATED),
            ((("authorization", "Bearer view-secret"),), grpc.StatusCode.PERMISSION_DENIED),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.DeployModelVersion(request, metadata=metadata)
            assert refused.value.code() == code
        rollout = (await stub.DeployModelVersion(request, metadata=as_deployer)).rollout
        assert rollout.initiated_by == "ci-bot"
        await stub.AbortRollout(
            pb.AbortRolloutRequest(rollout_id=rollout.rollout_id, reason="no"), metadata=as_deployer
        )
        audit = await stub.ListAuditRecords(pb.ListAuditRecordsRequest(model_name=model))
        by_action = {a.action: a.identity for a in audit.records}
        assert by_action["rollout.created"] == "ci-bot"
        assert by_action["rollout.rollback_started"] == "ci-bot"
