"""The gateway's routing domain: applying stream messages, the state file, the per-request choice
(pin, sticky split, rendezvous with failover), metric windows and shadow comparison."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fresco.api.common.v1 import values_pb2
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from gateway.metric_windows import MetricWindows, WindowKey
from gateway.route_choice import EndpointHealth, RouteChooser
from gateway.route_watch import STATE_FILE, apply, load_table, save_table
from gateway.routing import RouteTable as StaticRoutes
from gateway.shadow import compare
from model_manager import route_codec
from model_manager.routes import Endpoint, MetricsConfig, ModelRoute, RouteError, RouteTable, VersionRoute

E1, E2, E3 = (Endpoint(f"10.0.0.{i}", 9000) for i in (1, 2, 3))


def table(revision: int, canary: int, seed: str = "seed") -> RouteTable:
    versions = (VersionRoute("1", 1000 - canary, (E1, E2, E3), "fraud-v1"), VersionRoute("2", canary, (E3,)))
    return RouteTable(revision, (ModelRoute("fraud", versions, seed),))


def test_apply_takes_snapshots_and_updates_on_their_base_only() -> None:
    first = apply(None, pb.WatchRoutesResponse(snapshot=route_codec.table_message(table(3, 100))))
    assert first == table(3, 100)
    update = route_codec.update_message(table(3, 100), table(4, 500))
    assert apply(first, pb.WatchRoutesResponse(update=update)) == table(4, 500)
    with pytest.raises(RouteError, match="holds no table"):
        apply(None, pb.WatchRoutesResponse(update=update))
    with pytest.raises(RouteError, match=r"base_revision: expected 4 .*got 3"):
        apply(table(4, 500), pb.WatchRoutesResponse(update=update))  # a gap: the gateway is elsewhere
    with pytest.raises(RouteError, match=r"snapshot\.revision: expected at least the held revision 4, got 3"):
        apply(table(4, 500), pb.WatchRoutesResponse(snapshot=route_codec.table_message(table(3, 100))))
    broken = route_codec.update_message(table(4, 500), table(5, 10))
    broken.upserted_routes[0].targets[0].weight = 0
    broken.upserted_routes[0].targets[1].weight = 0
    with pytest.raises(RouteError, match=r"routes\[fraud\]\.versions: expected weights adding up to"):
        apply(table(4, 500), pb.WatchRoutesResponse(update=broken))


def test_the_state_file_is_replaced_whole_and_read_back(tmp_path: Path) -> None:
    assert load_table(tmp_path) is None
    save_table(tmp_path, table(7, 100))
    save_table(tmp_path, table(8, 200))
    loaded = load_table(tmp_path)
    assert loaded is not None
    assert loaded[0] == table(8, 200)
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]  # no temporary left behind
    (tmp_path / STATE_FILE).write_bytes(b"\xff not a table")
    assert load_table(tmp_path) is None  # a damaged file is ignored: the manager sends a snapshot


def chooser(current: RouteTable | None) -> RouteChooser:
    return RouteChooser(StaticRoutes({}, None), lambda: current, EndpointHealth(), random.Random(7))


def test_raising_the_canary_weight_moves_units_only_from_baseline_to_canary() -> None:
    units = [f"user-{i}" for i in range(3000)]
    before = {u: chooser(table(1, 100)).target(table(1, 100), "fraud", "", u).version for u in units}
    after = {u: chooser(table(2, 300)).target(table(2, 300), "fraud", "", u).version for u in units}
    moved = [u for u in units if before[u] != after[u]]
    assert moved, "raising the weight from 10% to 30% must move some units"
    assert all(before[u] == "1" and after[u] == "2" for u in moved)
    # The same unit gets the same answer every time at the same weights.
    assert all(chooser(table(2, 300)).target(table(2, 300), "fraud", "", u).version == after[u] for u in units[:200])


def test_a_pinned_version_wins_and_an_unrouted_one_goes_to_the_static_routes() -> None:
    current = table(1, 0)
    choice = RouteChooser(StaticRoutes({}, None), lambda: current)
    target = choice.target(current, "fraud", "2", "user-1")
    assert (target.version, target.endpoints, target.revision) == ("2", (E3.address,), 1)
    assert choice.target(current, "fraud", "1", "").predictor_model == "fraud-v1"
    static = choice.target(current, "fraud", "9", "")  # not in the route: the static routes pick an endpoint
    assert (static.version, static.endpoints, static.managed) == ("9", (), False)


def test_rendezvous_order_puts_unhealthy_endpoints_last() -> None:
    health = EndpointHealth(cooldown_s=60.0)
    current = table(1, 0)
    choice = RouteChooser(StaticRoutes({}, None), lambda: current, health)
    order = choice.target(current, "fraud", "1", "user-42").endpoints
    assert sorted(order) == sorted(e.address for e in (E1, E2, E3))
    health.failed(order[0])
    failed_over = choice.target(current, "fraud", "1", "user-42").endpoints
    assert failed_over == (*order[1:], order[0])  # the next in rendezvous order serves; the order is kept
    health.succeeded(order[0])
    assert choice.target(current, "fraud", "1", "user-42").endpoints == order


def test_windows_accumulate_per_version_and_revision_with_unique_ids() -> None:
    clock = iter(range(0, 10**12, 10**9))
    windows = MetricWindows("gw-1", clock_ns=lambda: next(clock))
    metrics = MetricsConfig((10.0, 100.0), 10.0)
    canary = WindowKey("fraud", "2", 5)
    for latency, status in ((5.0, "OK"), (50.0, "OK"), (500.0, "UNAVAILABLE"), (10.0, "INVALID_ARGUMENT")):
        windows.record(canary, metrics, status, latency, scores=(0.7,), score_output="p", score_bounds=(0.5,))
    windows.record(WindowKey("fraud", "1", 5), metrics, "OK", 1.0)
    first = {w.version: w for w in windows.roll()}
    window = first[2]
    assert (window.request_count, window.error_count, window.route_revision) == (4, 2, 5)
    assert dict(window.status_counts) == {"OK": 2, "UNAVAILABLE": 1, "INVALID_ARGUMENT": 1}
    assert list(window.latency.histogram.bucket_counts) == [2, 1, 1]  # bounds are inclusive upper bounds
    assert window.latency.max_ms == 500.0
    assert list(window.score_histograms[0].histogram.bucket_counts) == [0, 4]
    assert first[1].request_count == 1
    windows.record(canary, metrics, "OK", 1.0)
    second = windows.roll()
    ids = [w.window_id for w in [*first.values(), *second]]
    assert len(set(ids)) == 3
    assert all(i.startswith("gw-1/") for i in ids)
    assert second[0].window_start == window.window_end  # windows follow each other without a gap
    assert windows.roll() == []


def test_shadow_answers_are_compared_with_the_served_ones() -> None:
    served = {"p": values_pb2.Tensor(double_values=[0.2, 0.8]), "label": values_pb2.Tensor(int64_values=[1])}
    same = {"p": values_pb2.Tensor(double_values=[0.2, 0.8 + 1e-9]), "label": values_pb2.Tensor(int64_values=[1])}
    other = {"p": values_pb2.Tensor(double_values=[0.6, 0.4]), "label": values_pb2.Tensor(int64_values=[0])}
    disagreed, diff = compare(served, same, "p")
    assert not disagreed
    assert diff == pytest.approx(1e-9, abs=1e-12)
    disagreed, diff = compare(served, other, "p")
    assert disagreed
    assert diff == pytest.approx(0.4)
