"""The feature drift check of a rollout step through an in-process manager: a candidate whose inputs drift in the
step is rolled back with the reason; too few values hold the step as inconclusive, never a rollback."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import rollout_pb2 as rpb
from tests.model_manager.monitor_support import message, register, sketches_of, traffic
from tests.model_manager.rollout_support import LocalFleet, LocalHub, applied, canary, manager, status, wait_for


def step(percent: float, dwell_s: float) -> rpb.CanaryStep:
    s = rpb.CanaryStep(traffic_percent=percent)
    s.duration.FromNanoseconds(int(dwell_s * 1e9))
    return s


async def start(stub: object, model: str) -> rpb.Rollout:
    strategy = canary(step(10, 60), max_feature_psi=0.2, min_samples=100)
    request = pb.DeployModelVersionRequest(model_name=model, version=2, strategy=strategy, reason="nightly")
    deployed = await stub.DeployModelVersion(request)  # type: ignore[attr-defined]
    return await wait_for(status(stub, deployed.rollout.rollout_id), applied)  # type: ignore[arg-type]


async def test_a_candidate_whose_inputs_drift_in_the_step_is_rolled_back_with_the_reason(tmp_path: Path) -> None:
    async with manager(tmp_path, LocalFleet(), LocalHub(), drift_refresh_s=300) as (mm, stub):
        assert mm.registry is not None
        model = register(mm.registry, (1, 2))
        live = await start(stub, model)
        columns = traffic(13, 2000, {"users:visits": 1.0})
        window = message(model, 2, sketches_of(columns), end=time.time() - 0.01, revision=live.applied_revision)
        assert (await stub.ReportMetrics(pb.ReportMetricsRequest(gateway_id="gw", windows=[window]))).accepted_windows
        done = await wait_for(status(stub, live.rollout_id), lambda r: r.state == rpb.ROLLOUT_STATE_ROLLED_BACK)
        failed = next(e for e in done.events if e.type == rpb.ROLLOUT_EVENT_TYPE_ANALYSIS_FAILED)
        drift = next(d for d in failed.decisions if d.check == rpb.ANALYSIS_CHECK_FEATURE_DRIFT)
        assert drift.verdict == rpb.ANALYSIS_VERDICT_FAILED
        assert drift.threshold == pytest.approx(0.2)
        assert drift.measured_value > 0.2
        assert "users:visits" in drift.detail
        assert "users:age" not in drift.detail
        assert drift.sample_count == 2000


async def test_too_few_values_leave_the_drift_check_inconclusive(tmp_path: Path) -> None:
    async with manager(tmp_path, LocalFleet(), LocalHub(), drift_refresh_s=300) as (mm, stub):
        assert mm.registry is not None
        model = register(mm.registry, (1, 2))
        live = await start(stub, model)
        columns = traffic(14, 300, {"users:visits": 3.0})  # wildly off, but 300 < the policy's 1000 rows
        window = message(model, 2, sketches_of(columns), end=time.time() - 0.01, revision=live.applied_revision)
        assert (await stub.ReportMetrics(pb.ReportMetricsRequest(gateway_id="gw", windows=[window]))).accepted_windows

        def analysed(r: rpb.Rollout) -> bool:
            return any(d.check == rpb.ANALYSIS_CHECK_FEATURE_DRIFT and d.sample_count for d in r.analysis_results)

        held = await wait_for(status(stub, live.rollout_id), analysed)
        drift = next(d for d in held.analysis_results if d.check == rpb.ANALYSIS_CHECK_FEATURE_DRIFT)
        assert drift.verdict == rpb.ANALYSIS_VERDICT_INCONCLUSIVE
        assert drift.detail == "feature psi: 300/1000 values"
        assert held.state == rpb.ROLLOUT_STATE_PROGRESSING
