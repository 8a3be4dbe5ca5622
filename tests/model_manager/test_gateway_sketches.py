"""A real gateway process's metric windows carry value sketches of what each version was called with
and answered, and the predictions kept for late labels, joined by the request id every answer carries
(the caller's, else one the gateway generated). Real predictor, windows received by the manager's
ReportMetrics recorder."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
from grpc import aio
from prometheus_client import CollectorRegistry

from fresco.api.common.v1 import values_pb2
from fresco.api.gateway.v1 import gateway_pb2 as gpb
from fresco.api.models.v1 import routing_pb2
from fresco.monitoring.sketches import FEATURE, SCORE, ColumnSketch
from gateway.metric_windows import MetricWindows, WindowKey, WindowReporter
from model_manager.routes import MetricsConfig, Shadow
from tests.model_manager.gateway_world import (
    MODEL,
    Predictors,
    Running,
    closed_port,
    probabilities,
    request,
    start_gateway,
    start_predictors,
    table,
    version,
    wait_until,
)
from tests.model_manager.route_manager import RouteManager

pytestmark = pytest.mark.integration
WAIT_S = 60.0
GENERATED_ID = re.compile(r"[0-9a-f]{32}")
STATIC = (("label", 0), ("probabilities", (0.5, 0.5)))


@pytest.fixture(scope="module")
def predictors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Predictors]:
    yield from start_predictors(tmp_path_factory.mktemp("sketch-models"))


@pytest.fixture
async def manager() -> AsyncIterator[RouteManager]:
    running = await RouteManager().start()
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def gateway(manager: RouteManager, tmp_path: Path) -> AsyncIterator[Running]:
    running = Running(await start_gateway(manager.address, tmp_path / "state"))
    try:
        yield running
    finally:
        await running.close()


def received(manager: RouteManager, refused: int = 0) -> list[routing_pb2.MetricsWindow]:
    """Every window the manager accepted (after the first `refused` reports), each id once (a retried report
    brings the same ids again)."""
    unique: dict[str, routing_pb2.MetricsWindow] = {}
    for report in manager.servicer.reports[refused:]:
        for window in report.windows:
            unique.setdefault(window.window_id, window)
    return list(unique.values())


def requests(manager: RouteManager, version_number: int, shadow: bool = False, refused: int = 0) -> int:
    windows = received(manager, refused)
    return sum(w.request_count for w in windows if w.version == version_number and w.shadow == shadow)


def merged(windows: list[routing_pb2.MetricsWindow]) -> dict[tuple[int, str], ColumnSketch]:
    """The windows' sketches merged per (kind, name), as the manager merges them."""
    sketches: dict[tuple[int, str], ColumnSketch] = {}
    for window in windows:
        for message in window.value_sketches:
            sketch = ColumnSketch.from_proto(message)
            if (sketch.kind, sketch.name) in sketches:
                sketches[sketch.kind, sketch.name].merge(sketch)
            else:
                sketches[sketch.kind, sketch.name] = sketch
    return sketches


def retained(sketch: ColumnSketch) -> list[float]:
    """The values a KLL sketch holds, each repeated by its weight: all of them, exactly, below k."""
    return sorted(value for value, weight in sketch.kll for _ in range(int(weight)))


def records(windows: list[routing_pb2.MetricsWindow]) -> dict[str, tuple[float, str]]:
    return {r.request_id: (r.score, r.unit_id) for w in windows for r in w.prediction_records}


async def test_windows_sketch_each_feature_and_the_score_and_keep_each_prediction(manager, gateway, predictors) -> None:
    manager.hub.publish(table(1, version("1", 100, predictors.endpoint)))
    assert await manager.hub.wait_applied(MODEL, 1, WAIT_S)
    rows = predictors.rows()[:14]
    manager.servicer.fail_reports = 1  # retried under the same ids: nothing is counted twice
    kept: dict[str, tuple[float, str]] = {}
    for index, row in enumerate(rows[:6]):
        asked = request(row, unit_id=f"unit-{index}")
        if index % 2:
            asked.request_id = f"caller-{index}"
        answer = await gateway.stub.Predict(asked, timeout=30)
        if index % 2:
            assert answer.request_id == f"caller-{index}"  # the caller's id is kept
        else:
            assert GENERATED_ID.fullmatch(answer.request_id), answer.request_id
        kept[answer.request_id] = (float(probabilities(answer)[-1]), f"unit-{index}")
    batch = await gateway.stub.PredictBatch(
        gpb.PredictBatchRequest(requests=[request(r) for r in rows[6:]]), timeout=30
    )
    ids = [answer.request_id for answer in batch.responses]
    assert all(GENERATED_ID.fullmatch(i) for i in ids), ids
    assert len(set(ids)) == len(ids)
    kept.update({a.request_id: (float(probabilities(a)[-1]), "") for a in batch.responses})
    # A value no distribution holds still gets its answer, and is counted as what it is.
    odd = request(rows[0])
    odd.features["f0"].CopyFrom(values_pb2.Value(double_value=float("nan")))
    odd.features["f1"].CopyFrom(values_pb2.Value(double_value=float("inf")))
    odd_answer = await gateway.stub.Predict(odd, timeout=30)
    assert odd_answer.model_version == "1"

    await wait_until(lambda: requests(manager, 1, refused=1) == len(rows) + 1, "every prediction reported", WAIT_S)
    windows = [w for w in received(manager, refused=1) if w.version == 1]
    sketches = merged(windows)
    names = predictors.references["1"].model.feature_names
    assert {name for kind, name in sketches if kind == FEATURE} == set(names)
    sent = np.asarray(rows, dtype=np.float32).astype(np.float64)  # the model's FP32 inputs
    for column, name in enumerate(names):
        sketch = sketches[FEATURE, name]
        assert sketch.count == len(rows) + 1
        nulls, invalid = {"f0": (1, 0), "f1": (0, 1)}.get(name, (0, 0))
        assert (sketch.null_count, sketch.invalid_count) == (nulls, invalid), name
        extra = [] if name in ("f0", "f1") else [sent[0, column]]
        assert retained(sketch) == sorted([*sent[:, column], *extra]), name
    odd_score = float(probabilities(odd_answer)[-1])  # NaN, if the model passes NaN through: counted as null
    scores = [s for s, _ in kept.values()] + ([odd_score] if np.isfinite(odd_score) else [])
    score = sketches[SCORE, "probabilities"]
    assert score.count == len(rows) + 1
    assert retained(score) == pytest.approx(sorted(scores))
    got = records(windows)
    for request_id, (value, unit) in kept.items():
        assert got[request_id][0] == pytest.approx(value)
        assert got[request_id][1] == unit
    assert set(got) - set(kept) <= {odd_answer.request_id}
    assert sum(len(w.prediction_records) for w in windows) == len(got)  # each prediction kept once
    assert sum(w.prediction_records_dropped for w in windows) == 0
    # The refused report's windows came again whole under their ids: the manager counts each sketch once.
    refused = {w.window_id: w for w in manager.servicer.reports[0].windows}
    again = [w for r in manager.servicer.reports[1:] for w in r.windows if w.window_id in refused]
    assert again
    assert all(w == refused[w.window_id] for w in again)


async def test_fallback_answers_count_under_the_version_that_answered_and_static_ones_keep_nothing(
    manager, gateway, predictors
) -> None:
    live, down = predictors.endpoint, closed_port()
    manager.hub.publish(table(1, version("2", 100, down), version("1", 0, live), fallback="1", static_answer=STATIC))
    assert await manager.hub.wait_applied(MODEL, 1, WAIT_S)
    rows = predictors.rows()[:5]
    answered = []
    for row in rows[:3]:
        answer = await gateway.predict(row)
        assert (answer.model_version, answer.fallback) == ("1", True)
        answered.append(answer.request_id)
    manager.hub.publish(table(2, version("2", 100, down), static_answer=STATIC))  # no fallback version left
    assert await manager.hub.wait_applied(MODEL, 2, WAIT_S)
    static = []
    for row in rows[3:]:
        answer = await gateway.predict(row)
        assert (answer.model_version, answer.fallback) == ("", True)
        assert GENERATED_ID.fullmatch(answer.request_id)  # a static answer has an id too
        static.append(answer.request_id)

    await wait_until(lambda: (requests(manager, 1), requests(manager, 2)) == (3, 5), "3 answers and 5 failures")
    windows = received(manager)
    answering = [w for w in windows if w.version == 1]
    sketches = merged(answering)
    assert all(s.count == 3 for s in sketches.values())
    assert (SCORE, "probabilities") in sketches
    assert set(records(answering)) == set(answered)
    failed = [w for w in windows if w.version == 2]
    assert sum(w.fallback_count for w in failed) == 5
    assert not [s for w in failed for s in w.value_sketches]  # version 2 never answered
    assert not set(records(windows)) & set(static)


async def test_shadow_windows_carry_only_the_mirrored_scores(manager, gateway, predictors) -> None:
    live = predictors.endpoint
    manager.hub.publish(table(1, version("1", 100, live), version("2", 0, live), shadow=Shadow("2", 1.0)))
    assert await manager.hub.wait_applied(MODEL, 1, WAIT_S)
    rows = predictors.rows()[:6]
    for row in rows:
        assert (await gateway.predict(row)).model_version == "1"

    def compared() -> int:
        return sum(w.shadow_comparison.compared for w in received(manager) if w.shadow)

    await wait_until(lambda: (requests(manager, 1), compared()) == (6, 6), "6 live and 6 mirrored answers")
    shadow = [w for w in received(manager) if w.shadow]
    assert {(s.kind, s.name) for w in shadow for s in w.value_sketches} == {(SCORE, "probabilities")}
    mirrored = merged(shadow)[SCORE, "probabilities"]
    expected = predictors.references["2"].predict(rows)["probabilities"][:, -1].astype(np.float64)
    assert retained(mirrored) == pytest.approx(sorted(expected), abs=1e-6)
    assert not [r for w in shadow for r in w.prediction_records]
    live_windows = [w for w in received(manager) if not w.shadow]
    assert len(records(live_windows)) == 6
    assert sum(1 for kind, _ in merged(live_windows) if kind == FEATURE) == rows.shape[1]


async def test_the_record_cap_counts_what_it_leaves_out_and_sketches_can_be_turned_off(
    manager, predictors, tmp_path
) -> None:
    gateway = Running(
        await start_gateway(
            manager.address, tmp_path / "state", "--prediction-records-per-window", "2", "--no-value-sketches"
        )
    )
    try:
        manager.hub.publish(table(1, version("1", 100, predictors.endpoint)))
        assert await manager.hub.wait_applied(MODEL, 1, WAIT_S)
        rows = predictors.rows()[:5]
        batch = await gateway.stub.PredictBatch(
            gpb.PredictBatchRequest(requests=[request(r) for r in rows]), timeout=30
        )  # one group: one window holds all five
        await wait_until(lambda: requests(manager, 1) == 5, "the batch reported")
        windows = [w for w in received(manager) if w.version == 1]
        assert [r.request_id for w in windows for r in w.prediction_records] == [
            a.request_id for a in batch.responses[:2]
        ]
        assert sum(w.prediction_records_dropped for w in windows) == 3
        assert not [s for w in windows for s in w.value_sketches]
    finally:
        await gateway.close()


async def test_windows_heavy_with_records_are_reported_in_calls_within_the_byte_budget(manager) -> None:
    windows = MetricWindows("gw-heavy")
    for number in range(1, 7):
        windows.record(
            WindowKey(MODEL, str(number), 1), MetricsConfig(), "OK", 1.0, count=500, scores=[0.5] * 500,
            score_output="p", predictions=[(f"{number}-{i:05d}", "") for i in range(500)],
        )  # fmt: skip
    closed = windows.roll()
    budget = 2 * max(w.ByteSize() for w in closed) + 1  # two windows per call, never three
    reporter = WindowReporter(
        windows, aio.insecure_channel, manager.address, "gw-heavy", lambda: 60.0, CollectorRegistry(),
        max_report_bytes=budget,
    )  # fmt: skip
    reporter.pending = [(w, 0) for w in closed]
    manager.servicer.fail_reports = 1  # the first call fails: every window waits for the next flush
    try:
        await reporter.flush()
        assert len(manager.servicer.reports) == 1
        assert len(reporter.pending) == 6
        await reporter.flush()
    finally:
        await reporter.close()
    sent = manager.servicer.reports[1:]
    assert [len(r.windows) for r in sent] == [2, 2, 2]
    assert all(r.ByteSize() <= budget + 64 for r in sent)  # the budget counts windows; the request adds its id
    ids = [w.window_id for r in sent for w in r.windows]
    assert len(set(ids)) == 6
    assert sum(len(w.prediction_records) for r in sent for w in r.windows) == 3000
    assert not reporter.pending
