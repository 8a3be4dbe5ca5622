"""`fresco models monitor NAME` against a model manager in this process: the table per feature, the drifted feature
named, sparklines, notes; and how the view marks breaches in red."""

from __future__ import annotations

import asyncio
import io
import os
import re
import sys
import time
from pathlib import Path

from rich.console import Console

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import monitoring_pb2 as mpb
from fresco.monitor_view import BLOCKS, monitor_view, sparkline
from tests.model_manager.monitor_support import SCORE, message, register, scores, sketch, sketches_of, traffic
from tests.model_manager.rollout_support import LocalFleet, LocalHub, manager


async def fresco(address: str, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "COLUMNS": "260", "FRESCO_MODEL_MANAGER": address}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fresco.cli", "models", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 120)
    return process.returncode or 0, out.decode(), err.decode()


async def test_monitor_prints_each_feature_with_the_drifted_one_named(tmp_path: Path) -> None:
    async with manager(tmp_path, LocalFleet(), LocalHub(), drift_refresh_s=300) as (mm, stub):
        assert mm.registry is not None
        model = register(mm.registry)
        columns = traffic(8, 2000, {"users:spend": 0.7})
        window = message(
            model, 1, [*sketches_of(columns), sketch("probability", scores(8, 2000), SCORE)], end=time.time() - 1
        )
        assert (await stub.ReportMetrics(pb.ReportMetricsRequest(gateway_id="gw", windows=[window]))).accepted_windows

        code, out, err = await fresco(mm.app.address, "monitor", model)
        assert code == 0, err
        assert f"{model} v1 (production)" in out
        rows: dict[str, list[str]] = {}  # each name's row in the windows' table, then in the history's
        for line in out.splitlines():
            if line.startswith("│"):
                rows.setdefault(line.split("│")[1].strip(), []).append(line)
        assert set(rows) == {"users:age", "users:spend", "users:visits", "probability"}
        assert "2000" in rows["users:age"][0]
        assert "0.0% (0.0%)" in rows["users:spend"][0]
        assert "█" in rows["users:spend"][1], "the PSI history's sparkline, at its top"
        assert not any(block in rows["users:age"][1] for block in BLOCKS[2:]), "low PSI, low blocks"
        assert "drifted (1h): users:spend" in out
        assert "note: parity: no feature service configured" in out

        code, _, err = await fresco(mm.app.address, "monitor", model, "--version", "9")
        assert code == 1
        assert "monitor failed: NOT_FOUND" in err


def _window(name: str, psi: float, breached: bool) -> mpb.FeatureDriftWindow:
    measure = mpb.DriftMeasure(statistic=mpb.DRIFT_STATISTIC_PSI, value=psi, threshold=0.1, breached=breached)
    return mpb.FeatureDriftWindow(window=name, count=1500, judged=True, drifted=breached, measures=[measure])


def test_the_view_shows_breaches_in_red_and_unjudged_windows_marked() -> None:
    version = mpb.VersionMonitor(
        version=3,
        features=[
            mpb.FeatureMonitor(name="a:x", windows=[_window("5m", 0.02, False), _window("1h", 0.3, True)],
                               psi_history=[float("nan"), 0.05, 0.3]),
            mpb.FeatureMonitor(name="a:y", windows=[mpb.FeatureDriftWindow(window="5m", count=10)]),
        ],
        drifted_features=["a:x"],
    )  # fmt: skip
    console = Console(file=io.StringIO(), width=250, force_terminal=True, color_system="standard")
    console.print(monitor_view("churn", pb.GetModelMonitorResponse(versions=[version])))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert re.search(r"\x1b\[1;31m *0\.300/–/–\x1b\[0m", text), "the breached window in bold red"
    assert re.search(r"\x1b\[1;31ma:x *\x1b\[0m", text), "the drifted feature's name in bold red"
    assert not re.search(r"\x1b\[1;31m *0\.020", text), "the window within its limits is not red"
    assert "–/–/–*" in text, "a window too small to judge is marked"
    assert "drifted (1h): a:x" in text


def test_sparklines_fold_a_day_into_columns_and_leave_empty_buckets_blank() -> None:
    assert sparkline([float("nan")] * 6 + [0.0] * 6 + [0.2] * 6, 0.2, width=3) == " ▁█"
    assert sparkline([0.1] * 289, 0.2) == "▅" * 42, "a day in at most SPARK_WIDTH columns of 7 buckets"
    assert sparkline([], 1.0) == ""


async def test_monitor_prints_the_quality_late_labels_give(tmp_path: Path) -> None:
    async with manager(tmp_path, LocalFleet(), LocalHub(), drift_refresh_s=300) as (mm, stub):
        assert mm.registry is not None
        model = register(mm.registry)
        window = message(model, 1, sketches_of(traffic(8, 1000, {})), end=time.time() - 1)
        now_us = int(time.time() * 1e6)
        records = [("r1", 0.9), ("r2", 0.8), ("r3", 0.3), ("r4", 0.2)]
        for request_id, score in records:
            record = window.prediction_records.add(request_id=request_id, score=score)
            record.time.FromMicroseconds(now_us - 2_000_000)
        assert (await stub.ReportMetrics(pb.ReportMetricsRequest(gateway_id="gw", windows=[window]))).accepted_windows
        labels = [mpb.Label(request_id=r, value=v) for r, v in (("r1", 1), ("r2", 0), ("r3", 0), ("r4", 0))]

        async def batches():  # type: ignore[no-untyped-def]
            yield pb.LogLabelsRequest(labels=labels, batch_id="b", model_name=model)

        acks = [ack async for ack in stub.LogLabels(batches())]
        assert sum(ack.accepted for ack in acks) == 4

        code, out, err = await fresco(mm.app.address, "monitor", model)
        assert code == 0, err
        assert f"{model}: prediction quality from late labels" in out
        rows = [line for line in out.splitlines() if line.startswith("│ v1") and "│ all" in line]
        assert len(rows) == 1, out
        cells = [cell.strip() for cell in rows[0].split("│")[1:-1]]
        # version, window, task, predictions, labelled, accuracy (3 of 4 right at 0.5), auc (1.0: the positive
        # scores highest), logloss, mae, rmse (classifier: none), ECE, entropy
        assert cells[:7] == ["v1", "all", "binary", "4", "4", "0.750", "1.000"]
        assert cells[8:10] == ["—", "—"]
