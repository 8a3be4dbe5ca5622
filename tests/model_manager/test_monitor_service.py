"""GetModelMonitor and the drift gauges through a model manager in this process (SQLite): windows reported with
value sketches, counted once, drift shown on the shifted feature only, bad input and bad sketches refused."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import monitoring_pb2 as mpb
from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager.monitor_store import monitor_buckets, monitor_windows
from tests.model_manager.monitor_support import (
    REFS,
    SCORE,
    message,
    register,
    scores,
    sketch,
    sketches_of,
    traffic,
)
from tests.model_manager.rollout_support import LocalFleet, LocalHub, manager

PSI = mpb.DRIFT_STATISTIC_PSI


def drifted_window(model: str, version: int, seed: int, rows: int = 2000, shift: float = 0.6) -> object:
    columns = traffic(seed, rows, {"users:spend": shift})
    return message(
        model, version, [*sketches_of(columns), sketch("probability", scores(seed, rows), SCORE)], end=time.time() - 1
    )


async def test_the_monitor_shows_drift_on_the_shifted_feature_only_and_counts_a_retry_once(tmp_path: Path) -> None:
    async with manager(tmp_path, LocalFleet(), LocalHub(), drift_refresh_s=300) as (mm, stub):
        assert mm.registry is not None
        model = register(mm.registry)
        window = drifted_window(model, 1, seed=5)
        report = pb.ReportMetricsRequest(gateway_id="gw-1", windows=[window])  # type: ignore[list-item]
        assert (await stub.ReportMetrics(report)).accepted_windows == 1
        assert (await stub.ReportMetrics(report)).duplicate_windows == 1

        answer = await stub.GetModelMonitor(pb.GetModelMonitorRequest(model_name=model))
        (version,) = answer.versions
        assert version.version == 1
        assert version.stage == rpb.MODEL_STAGE_PRODUCTION
        assert [f.name for f in version.features] == [*REFS, "probability"], "inputs in signature order, then scores"
        assert [f.kind for f in version.features] == [mpb.VALUE_SKETCH_KIND_FEATURE] * 3 + [SCORE]
        assert list(version.drifted_features) == ["users:spend"]
        assert version.policy.min_rows == 1000
        assert version.policy.defaults.max_psi == pytest.approx(0.1)
        for feature in version.features:
            assert [w.window for w in feature.windows] == ["5m", "1h", "1d"]
            five = feature.windows[0]
            assert five.count == 2000, "the retried report is counted once"
            assert five.judged
            psi = next(m for m in five.measures if m.statistic == PSI)
            assert psi.breached == (feature.name == "users:spend"), (feature.name, psi)
            assert len(feature.psi_history) == 289
            assert not math.isnan(feature.psi_history[-1]) or not math.isnan(feature.psi_history[-2])
            assert feature.null_rate_history[-1] == 0.0 or feature.null_rate_history[-2] == 0.0
        assert any("no feature service configured" in note for note in answer.notes)

        assert mm.drift_refresher is not None
        assert mm.drift_refresher.refresh() == 1
        registry = mm.app.registry

        def gauge(name: str, feature: str, window: str = "1h") -> float | None:
            labels = {"model": model, "version": "1", "feature": feature, "kind": "feature", "window": window}
            return registry.get_sample_value(name, labels)

        assert gauge("fresco_feature_drift_breached", "users:spend") == 1.0
        assert gauge("fresco_feature_drift_breached", "users:age") == 0.0
        assert gauge("fresco_feature_drift_values", "users:age", "5m") == 2000.0
        psi_spend = gauge("fresco_feature_drift_psi", "users:spend")
        assert psi_spend is not None
        assert psi_spend > 0.1
        score = {"model": model, "version": "1", "feature": "probability", "kind": "score", "window": "1d"}
        assert registry.get_sample_value("fresco_feature_null_rate", score) == 0.0


async def test_bad_monitor_requests_name_the_field(tmp_path: Path) -> None:
    async with manager(tmp_path, LocalFleet(), LocalHub(), drift_refresh_s=300) as (mm, stub):
        assert mm.registry is not None
        model = register(mm.registry)
        cases = [
            (pb.GetModelMonitorRequest(model_name=""), grpc.StatusCode.INVALID_ARGUMENT, "model_name"),
            (pb.GetModelMonitorRequest(model_name="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
            (pb.GetModelMonitorRequest(model_name=model, versions=[1, -2]), grpc.StatusCode.INVALID_ARGUMENT,
             "versions[1]"),
            (pb.GetModelMonitorRequest(model_name=model, versions=[7]), grpc.StatusCode.NOT_FOUND, "7"),
        ]  # fmt: skip
        for request, code, field in cases:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetModelMonitor(request)
            assert caught.value.code() == code, request
            assert field in (caught.value.details() or ""), caught.value.details()
        # A version asked for that never reported: its inputs, nothing counted, nothing judged.
        quiet = await stub.GetModelMonitor(pb.GetModelMonitorRequest(model_name=model, versions=[1]))
        (version,) = quiet.versions
        assert [f.name for f in version.features] == list(REFS)
        assert all(w.count == 0 and not w.judged for f in version.features for w in f.windows)


async def test_a_bad_sketch_is_rejected_naming_the_field_and_the_rest_is_kept(tmp_path: Path) -> None:
    async with manager(tmp_path, LocalFleet(), LocalHub(), drift_refresh_s=300) as (mm, stub):
        assert mm.registry is not None
        model = register(mm.registry)
        bad = sketch("users:age", [1.0, 2.0])
        bad.count = 5  # parts add up to 2
        corrupt = sketch("users:spend", [float(i) for i in range(500)])
        corrupt.kll_sketch = corrupt.kll_sketch[:20] + b"\xff" * 4 + corrupt.kll_sketch[24:]
        windows = [
            message(model, 1, [bad], end=time.time() - 1, wid="bad-count"),
            message(model, 1, [corrupt], end=time.time() - 1, wid="bad-kll"),
            drifted_window(model, 1, seed=9, rows=100),
        ]
        reply = await stub.ReportMetrics(pb.ReportMetricsRequest(gateway_id="gw-1", windows=windows))  # type: ignore[arg-type]
        assert reply.accepted_windows == 1
        assert [r.split(":")[0] for r in reply.rejected] == ["bad-count", "bad-kll"]
        assert "value_sketches[0].count" in reply.rejected[0]
        assert "value_sketches[0].kll_sketch" in reply.rejected[1]
        answer = await stub.GetModelMonitor(pb.GetModelMonitorRequest(model_name=model))
        assert answer.versions[0].features[0].windows[0].count == 100


async def test_a_restart_keeps_the_history_and_merges_windows_a_crash_left_unmerged(tmp_path: Path) -> None:
    async with manager(tmp_path, LocalFleet(), LocalHub(), drift_refresh_s=300) as (mm, stub):
        assert mm.registry is not None
        model = register(mm.registry)
        report = pb.ReportMetricsRequest(gateway_id="gw-1", windows=[drifted_window(model, 1, seed=5)])  # type: ignore[list-item]
        assert (await stub.ReportMetrics(report)).accepted_windows == 1
        before = await stub.GetModelMonitor(pb.GetModelMonitorRequest(model_name=model))
    async with manager(tmp_path, LocalFleet(), LocalHub(), drift_refresh_s=300) as (mm, stub):
        after = await stub.GetModelMonitor(pb.GetModelMonitorRequest(model_name=model))
        assert after.versions[0].features[1].windows[2].count == 2000
        assert list(after.versions[0].drifted_features) == list(before.versions[0].drifted_features)
        assert mm.registry is not None
        with mm.registry.engine.begin() as conn:  # as if the manager had died between the ledger and the store
            conn.execute(sa.delete(monitor_buckets))
            conn.execute(sa.delete(monitor_windows))
    async with manager(tmp_path, LocalFleet(), LocalHub(), drift_refresh_s=300) as (mm, stub):
        deadline = time.monotonic() + 30
        while True:
            again = await stub.GetModelMonitor(pb.GetModelMonitorRequest(model_name=model, versions=[1]))
            if again.versions[0].features[1].windows[2].count == 2000:
                break
            assert time.monotonic() < deadline, "the stored window was never merged again"
            await asyncio.sleep(0.05)
        assert (await stub.ReportMetrics(report)).duplicate_windows == 1
        once = await stub.GetModelMonitor(pb.GetModelMonitorRequest(model_name=model, versions=[1]))
        assert once.versions[0].features[1].windows[2].count == 2000, "merged once, the retry not again"
