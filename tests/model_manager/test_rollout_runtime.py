"""The rollout runtime through the model manager's RPCs, in process on SQLite: canaries judged on reported windows,
rollbacks with their reasons, holds on too little traffic, verbs, watches, and a restart mid-rollout."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import rollout_pb2 as rpb
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
        assert started and started[0].identity == "system:rollout-controller"
        decisions = json.loads(started[0].details["decisions"])
        assert any(d["check"] == "error_rate" and d["samples"] == 400 for d in decisions)
        assert mm.registry.get_model(model).production_version == 1
        await wait_for(status(stub, rid), lambda r: not r.traffic or (model, 2) in fleet.released)
        assert (model, 2) in fleet.released, "the rolled-back version is unloaded"
