"""The drift gate through an in-process manager: live input drift blocks a promotion with the reason, force with a
reason promotes over it (audited), too little data passes with a note (or fails when live data is required), and a
later promotion passes once the drift has cleared."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager.lifecycle import Stage
from tests.model_manager.monitor_support import message, register, sketches_of, traffic
from tests.model_manager.rollout_support import LocalFleet, LocalHub, manager

if TYPE_CHECKING:
    from tests.model_manager.rollout_support import Stub

DRIFT_ONLY = rpb.PromotionGates(drift=rpb.DriftGate())


async def promote(stub: Stub, model: str, version: int, **fields: object) -> rpb.Operation:
    """Promote to candidate and wait for the verdict."""
    request = pb.PromoteModelVersionRequest(model_name=model, version=version, **fields)  # type: ignore[arg-type]
    operation = (await stub.PromoteModelVersion(request)).operation
    deadline = time.monotonic() + 30
    while not operation.done:
        assert time.monotonic() < deadline, operation
        await asyncio.sleep(0.02)
        operation = (await stub.GetOperation(pb.GetOperationRequest(operation_id=operation.operation_id))).operation
    return operation


async def live(stub: Stub, model: str, seed: int, rows: int, shift: float) -> None:
    """Production's live inputs, one window, `users:spend` shifted by `shift` sd."""
    columns = traffic(seed, rows, {"users:spend": shift})
    window = message(model, 1, sketches_of(columns), end=time.time() - 1)
    reply = await stub.ReportMetrics(pb.ReportMetricsRequest(gateway_id="gw-1", windows=[window]))
    assert reply.accepted_windows == 1, reply


async def test_drift_blocks_a_promotion_with_the_reason_until_forced_or_cleared(tmp_path: Path) -> None:
    async with manager(tmp_path, LocalFleet(), LocalHub(), drift_refresh_s=300) as (mm, stub):
        assert mm.registry is not None
        model = register(mm.registry, (1, 2, 3, 4), stage=Stage.REGISTERED)
        await live(stub, model, seed=21, rows=2000, shift=0.6)

        blocked = await promote(stub, model, 2, gates=DRIFT_ONLY)
        assert blocked.state == rpb.OPERATION_STATE_FAILED
        (result,) = blocked.gate_results
        assert result.type == rpb.GATE_TYPE_DRIFT
        assert not result.passed
        assert "users:spend (PSI" in result.detail
        assert "users:age" not in result.detail
        assert "users:spend" in blocked.error
        assert result.measured_value > result.threshold == pytest.approx(0.1)
        assert (await version(stub, model, 2)).stage == rpb.MODEL_STAGE_REJECTED

        with pytest.raises(grpc.aio.AioRpcError) as no_reason:
            await promote(stub, model, 3, gates=DRIFT_ONLY, force=True)
        assert no_reason.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        forced = await promote(stub, model, 3, gates=DRIFT_ONLY, force=True, reason="known seasonal shift in spend")
        assert forced.state == rpb.OPERATION_STATE_SUCCEEDED
        assert forced.forced
        assert (await version(stub, model, 3)).stage == rpb.MODEL_STAGE_CANDIDATE
        audit = await stub.ListAuditRecords(pb.ListAuditRecordsRequest(model_name=model))
        moved = [a for a in audit.records if a.version == 3 and a.details.get("to") == "candidate"]
        assert moved, audit.records
        assert moved[0].reason == "known seasonal shift in spend"
        assert moved[0].details["forced"] == "true"
        assert moved[0].details["gate.drift"].startswith("failed: ")
        assert "users:spend" in moved[0].details["gate.drift"]

        # The drift clears: normal traffic returns and outweighs the shifted window in the gate's hour.
        for seed in range(30, 50):
            await live(stub, model, seed=seed, rows=2000, shift=0.0)
        cleared = await promote(stub, model, 4, gates=DRIFT_ONLY)
        assert cleared.state == rpb.OPERATION_STATE_SUCCEEDED, cleared
        assert cleared.gate_results[0].passed
        assert cleared.gate_results[0].detail.startswith("no drift over the limits in the 1h window")


async def test_too_little_live_data_passes_with_a_note_unless_live_data_is_required(tmp_path: Path) -> None:
    async with manager(tmp_path, LocalFleet(), LocalHub(), drift_refresh_s=300) as (mm, stub):
        assert mm.registry is not None
        model = register(mm.registry, (1, 2, 3), stage=Stage.REGISTERED)
        await live(stub, model, seed=3, rows=50, shift=3.0)  # a wild but tiny sample
        promotions = mm.servicer.promotions
        assert promotions is not None
        assert promotions.defaults.HasField("drift"), "the drift gate is among the server's default gates"
        passed = await promote(stub, model, 2, gates=DRIFT_ONLY)
        assert passed.state == rpb.OPERATION_STATE_SUCCEEDED, passed
        drift = next(r for r in passed.gate_results if r.type == rpb.GATE_TYPE_DRIFT)
        assert drift.passed
        assert drift.detail.startswith("too little live data in the 1h window")
        assert "users:spend (50 values)" in drift.detail
        strict = rpb.PromotionGates(drift=rpb.DriftGate(window="5m", require_live_data=True))
        refused = await promote(stub, model, 3, gates=strict)
        assert refused.state == rpb.OPERATION_STATE_FAILED
        assert "the gate requires live data" in refused.gate_results[0].detail
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await promote(stub, model, 3, gates=rpb.PromotionGates(drift=rpb.DriftGate(window="2h")))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "gates.drift.window" in (bad.value.details() or "")


async def version(stub: Stub, model: str, number: int) -> rpb.ModelVersion:
    reply = await stub.GetModelVersion(pb.GetModelVersionRequest(model_name=model, version=number))
    return reply.model_version
