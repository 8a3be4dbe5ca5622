"""A real gateway process routed by the model manager's WatchRoutes, served in this process from a
RouteHub the tests publish into, in front of a real predictor serving versions 1 and 2."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc import aio

from fresco.api.gateway.v1 import gateway_pb2 as gpb
from fresco.api.models.v1 import routing_pb2
from model_manager.routes import Endpoint, Shadow
from model_manager.split import rendezvous_order, sticky_version
from tests.model_manager.gateway_world import (
    MODEL,
    Predictors,
    Running,
    StalledPredictor,
    closed_port,
    metric,
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


@pytest.fixture(scope="module")
def predictors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Predictors]:
    yield from start_predictors(tmp_path_factory.mktemp("route-models"))


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


async def test_snapshot_then_update_each_acknowledged_and_served(manager, gateway, predictors) -> None:
    live = predictors.endpoint
    row = predictors.rows()[0]
    manager.hub.publish(table(1, version("1", 100, live), version("2", 0, live)))
    assert await manager.hub.wait_applied(MODEL, 1, WAIT_S)
    answer = await gateway.predict(row)
    assert (answer.model, answer.model_version, answer.fallback) == (MODEL, "1", False)
    np.testing.assert_allclose(probabilities(answer), predictors.references["1"].predict(row[None])["probabilities"][0])

    manager.hub.publish(table(2, version("1", 0, live), version("2", 100, live)))
    assert await manager.hub.wait_applied(MODEL, 2, WAIT_S)
    assert (await gateway.predict(row)).model_version == "2"
    assert (await gateway.predict(row, pinned="1")).model_version == "1"  # a pinned version wins

    kinds = [m.WhichOneof("kind") for m in manager.servicer.sent]
    assert kinds == ["snapshot", "update"]
    acks = [(r.ack.revision, r.ack.accepted) for r in manager.servicer.received if r.HasField("ack")]
    assert acks == [(1, True), (2, True)]
    assert metric(gateway.process, "fresco_gateway_route_revision") == 2
    assert metric(gateway.process, "fresco_gateway_route_staleness_seconds") == 0


async def test_a_rejected_revision_keeps_the_last_good_table(predictors, tmp_path) -> None:
    live = predictors.endpoint
    row = predictors.rows()[0]
    manager = await RouteManager().start()
    port = manager.app.port
    gateway = Running(await start_gateway(manager.address, tmp_path / "state"))
    try:
        manager.hub.publish(table(5, version("1", 0, live), version("2", 100, live)))
        assert await manager.hub.wait_applied(MODEL, 5, WAIT_S)
        await manager.stop()

        # A manager that lost its revisions comes back on the same port and publishes an older one.
        manager = await RouteManager(port=port).start()
        manager.hub.publish(table(3, version("1", 100, live), version("2", 0, live)))
        await wait_until(lambda: manager.hub.rejections(MODEL), "the gateway's rejection")
        [(gateway_id, revision, error)] = manager.hub.rejections(MODEL)
        assert (gateway_id, revision) == ("gw-test", 3)
        assert "expected at least the held revision 5" in error
        assert manager.hub.applied_revision(MODEL) == 0
        assert (await gateway.predict(row)).model_version == "2"  # still the last good table

        manager.hub.publish(table(6, version("1", 100, live), version("2", 0, live)))
        assert await manager.hub.wait_applied(MODEL, 6, WAIT_S)
        assert (await gateway.predict(row)).model_version == "1"
    finally:
        await gateway.close()
        await manager.stop()


async def test_serves_from_its_state_dir_while_the_manager_is_down_then_resumes(predictors, tmp_path) -> None:
    live = predictors.endpoint
    row = predictors.rows()[0]
    state = tmp_path / "state"
    manager = await RouteManager().start()
    port = manager.app.port
    first = Running(await start_gateway(manager.address, state))
    try:
        manager.hub.publish(table(1, version("1", 100, live), version("2", 0, live)))
        manager.hub.publish(table(2, version("1", 0, live), version("2", 100, live)))
        assert await manager.hub.wait_applied(MODEL, 2, WAIT_S)
        await manager.stop()
        assert (await first.predict(row)).model_version == "2"  # the manager is down: the table serves
        await wait_until(
            lambda: (metric(first.process, "fresco_gateway_route_staleness_seconds") or 0) > 0, "staleness"
        )
    finally:
        await first.close()

    # A new gateway process, the manager still down: it serves what its state directory holds.
    second = Running(await start_gateway(f"127.0.0.1:{port}", state))
    try:
        assert (await second.predict(row)).model_version == "2"
        assert metric(second.process, "fresco_gateway_route_revision") == 2
        assert (metric(second.process, "fresco_gateway_route_staleness_seconds") or 0) > 0

        back = RouteManager(port=port)
        back.hub.publish(table(2, version("1", 0, live), version("2", 100, live)))
        back.hub.publish(table(3, version("1", 100, live), version("2", 0, live)))
        await back.start()
        try:
            assert await back.hub.wait_applied(MODEL, 3, WAIT_S)
            [subscription] = [r.subscribe for r in back.servicer.received if r.HasField("subscribe")]
            assert subscription.resume_from_revision == 2
            # It resumed from revision 2 with only the update to 3, not a snapshot.
            assert [(m.WhichOneof("kind"), m.update.base_revision) for m in back.servicer.sent] == [("update", 2)]
            assert (await second.predict(row)).model_version == "1"
            assert metric(second.process, "fresco_gateway_route_staleness_seconds") == 0
        finally:
            await back.stop()
    finally:
        await second.close()


async def test_raising_the_canary_weight_moves_units_only_to_the_canary(manager, gateway, predictors) -> None:
    live = predictors.endpoint
    rows = predictors.rows()
    units = [f"user-{i}" for i in range(300)]

    async def versions() -> dict[str, str]:
        batch = gpb.PredictBatchRequest(requests=[request(rows[i % len(rows)], u) for i, u in enumerate(units)])
        answer = await gateway.stub.PredictBatch(batch, timeout=60)
        return {u: r.model_version for u, r in zip(units, answer.responses, strict=True)}

    low = table(1, version("1", 9000, live), version("2", 1000, live))
    manager.hub.publish(low)
    assert await manager.hub.wait_applied(MODEL, 1, WAIT_S)
    before = await versions()
    assert before == await versions()  # sticky: the same units, the same versions
    # The gateway splits exactly as the shared split does, so every process agrees.
    assert before == {u: sticky_version(low.route(MODEL), u).version for u in units}

    manager.hub.publish(table(2, version("1", 6000, live), version("2", 4000, live)))
    assert await manager.hub.wait_applied(MODEL, 2, WAIT_S)
    after = await versions()
    moved = [u for u in units if before[u] != after[u]]
    assert moved, "10% -> 40% must move some of 300 units"
    assert all((before[u], after[u]) == ("1", "2") for u in moved)


async def test_an_unreachable_replica_fails_over_to_the_next_in_rendezvous_order(manager, gateway, predictors) -> None:
    down, live = closed_port(), predictors.endpoint
    manager.hub.publish(table(1, version("1", 100, down, live)))
    assert await manager.hub.wait_applied(MODEL, 1, WAIT_S)
    units = [f"user-{i}" for i in range(20)]
    first_choices = {u: rendezvous_order(u, (down, live))[0] for u in units}
    assert down in first_choices.values(), "some unit must prefer the unreachable replica for the test to mean anything"
    row = predictors.rows()[0]
    for unit in units:
        answer = await gateway.predict(row, unit)
        assert (answer.model_version, answer.fallback) == ("1", False)


async def test_a_replica_lost_after_pinning_fails_over_on_inference(manager, gateway, predictors) -> None:
    live = predictors.endpoint
    extra_process = await asyncio.to_thread(predictors.start_another)
    try:
        extra = Endpoint.parse(extra_process.address)
        manager.hub.publish(table(1, version("1", 100, extra, live)))
        assert await manager.hub.wait_applied(MODEL, 1, WAIT_S)
        units = [u for u in (f"user-{i}" for i in range(40)) if rendezvous_order(u, (extra, live))[0] == extra]
        assert units, "some unit must prefer the extra replica for the test to mean anything"
        row = predictors.rows()[0]
        for unit in units:  # the gateway pins the version on the extra replica and is answered there
            assert (await gateway.predict(row, unit)).model_version == "1"
    finally:
        await asyncio.to_thread(extra_process.stop)
    # The replica is gone, its pinned signature still cached: each call fails over to the next replica.
    for unit in units:
        answer = await gateway.predict(row, unit)
        assert (answer.model_version, answer.fallback) == ("1", False)
    np.testing.assert_allclose(probabilities(answer), predictors.references["1"].predict(row[None])["probabilities"][0])


async def test_a_failing_version_falls_back_with_the_reason(manager, gateway, predictors) -> None:
    live, down = predictors.endpoint, closed_port()
    manager.hub.publish(table(1, version("2", 100, down), version("1", 0, live), fallback="1"))
    assert await manager.hub.wait_applied(MODEL, 1, WAIT_S)
    row = predictors.rows()[0]
    answer = await gateway.predict(row)
    assert (answer.model_version, answer.fallback) == ("1", True)
    assert "version 2 failed" in answer.fallback_reason, answer.fallback_reason
    np.testing.assert_allclose(probabilities(answer), predictors.references["1"].predict(row[None])["probabilities"][0])
    healthy = table(2, version("2", 100, live), version("1", 0, live), fallback="1")
    manager.hub.publish(healthy)
    assert await manager.hub.wait_applied(MODEL, 2, WAIT_S)
    answer = await gateway.predict(row)
    assert (answer.model_version, answer.fallback, answer.fallback_reason) == ("2", False, "")
    # A caller's mistake is the caller's: no fallback, and its own status code in the windows.
    bad = gpb.PredictRequest(model=MODEL, features={"f0": request(row).features["f0"]})
    with pytest.raises(aio.AioRpcError) as caught:
        await gateway.stub.Predict(bad, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    def statuses() -> dict[tuple[int, int], dict[str, int]]:
        counts: dict[tuple[int, int], dict[str, int]] = {}
        for report in manager.servicer.reports:
            for window in report.windows:
                into = counts.setdefault((window.route_revision, window.version), {})
                for code, n in window.status_counts.items():
                    into[code] = into.get(code, 0) + n
                into["fallback"] = into.get("fallback", 0) + window.fallback_count
        return counts

    expected = {
        (1, 2): {"UNAVAILABLE": 1, "fallback": 1},  # the failed version counts the error and the fallback
        (1, 1): {"OK": 1, "fallback": 0},  # the fallback version counts the answer it gave
        (2, 2): {"OK": 1, "INVALID_ARGUMENT": 1, "fallback": 0},
    }
    await wait_until(lambda: statuses() == expected, f"windows {expected}")


async def test_shadow_traffic_is_compared_and_never_changes_answers(manager, gateway, predictors) -> None:
    live = predictors.endpoint
    manager.hub.publish(table(1, version("1", 100, live), version("2", 0, live), shadow=Shadow("2", 1.0)))
    assert await manager.hub.wait_applied(MODEL, 1, WAIT_S)
    rows = predictors.rows()[:12]
    manager.servicer.fail_reports = 1  # the first report fails: it is retried with the same window ids
    for row in rows:
        answer = await gateway.predict(row)
        assert (answer.model_version, answer.fallback) == ("1", False)
        np.testing.assert_allclose(
            probabilities(answer), predictors.references["1"].predict(row[None])["probabilities"][0]
        )

    def windows() -> list[routing_pb2.MetricsWindow]:
        return [w for report in manager.servicer.reports[1:] for w in report.windows]

    def totals() -> tuple[int, int]:
        live_count = sum(w.request_count for w in windows() if not w.shadow and w.version == 1)
        compared = sum(w.shadow_comparison.compared for w in windows() if w.shadow and w.version == 2)
        return live_count, compared

    await wait_until(lambda: totals() == (12, 12), "12 live and 12 compared requests reported")
    reported = windows()
    # Versions 1 and 2 are different classifiers: their probabilities disagree on some rows.
    assert sum(w.shadow_comparison.disagreed for w in reported if w.shadow) > 0
    assert all(w.route_revision == 1 and w.model_name == MODEL for w in reported)
    assert sum(w.status_counts["OK"] for w in reported if not w.shadow) == 12
    # The refused report's windows came again under the same ids, and each id counts once.
    refused = {w.window_id for w in manager.servicer.reports[0].windows}
    resent = {w.window_id for w in reported}
    assert refused
    assert refused <= resent
    ids = [w.window_id for report in manager.servicer.reports[1:] for w in report.windows]
    assert len(ids) == len(set(ids))


async def test_a_full_shadow_queue_drops_and_counts_without_slowing_answers(manager, predictors, tmp_path) -> None:
    live, stalled = predictors.endpoint, await StalledPredictor().start()
    # One mirror in flight (stalled until the end of the test, its deadline 120 s away) and one queued:
    # of 10 requests answered meanwhile, 8 (9 if the worker had not yet taken the first) find the queue full.
    gateway = Running(
        await start_gateway(
            manager.address, tmp_path / "state", "--shadow-queue-size", "1", "--shadow-workers", "1",
            "--shadow-timeout-s", "120",
        )
    )  # fmt: skip
    try:
        manager.hub.publish(
            table(1, version("1", 100, live), version("2", 0, stalled.endpoint), shadow=Shadow("2", 1.0))
        )
        assert await manager.hub.wait_applied(MODEL, 1, WAIT_S)
        for row in predictors.rows()[:10]:
            answer = await gateway.predict(row)  # each within its 30 s deadline, though the mirror never returns
            assert answer.model_version == "1"
        await wait_until(lambda: stalled.calls == 1, "the mirror in flight to reach the stalled predictor")
        dropped = metric(gateway.process, "fresco_gateway_shadow_dropped_total", {"model": MODEL})
        assert dropped in (8.0, 9.0), dropped
        assert stalled.calls == 1  # the worker is still held by the first mirror
    finally:
        await gateway.close()
        await stalled.stop()


async def test_the_static_answer_stands_in_when_no_version_can_serve(manager, gateway, predictors) -> None:
    first_down, second_down = closed_port(), closed_port()
    static = (("label", 0), ("probabilities", (0.5, 0.5)))
    manager.hub.publish(table(1, version("2", 100, first_down), static_answer=static))
    assert await manager.hub.wait_applied(MODEL, 1, WAIT_S)
    row = predictors.rows()[0]
    answer = await gateway.predict(row)
    assert (answer.model, answer.model_version, answer.fallback) == (MODEL, "", True)
    assert "version 2 failed" in answer.fallback_reason
    assert list(answer.outputs["label"].int64_values) == [0]
    assert list(probabilities(answer)) == [0.5, 0.5]

    # The fallback version fails too: the static answer still stands in, and says both failed.
    both = table(2, version("2", 100, first_down), version("1", 0, second_down), fallback="1", static_answer=static)
    manager.hub.publish(both)
    assert await manager.hub.wait_applied(MODEL, 2, WAIT_S)
    only_label = request(row)
    only_label.outputs.append("label")
    answer = await gateway.stub.Predict(only_label, timeout=30)
    assert (answer.model_version, answer.fallback) == ("", True)
    assert "version 2 failed" in answer.fallback_reason
    assert "fallback version 1 failed" in answer.fallback_reason
    assert set(answer.outputs) == {"label"}  # only the outputs asked for
