"""Rollout state survives the manager: a restart mid-rollout resumes from the database with route revisions that
keep growing, metric windows count once across retries and restarts, and the store round-trips on PostgreSQL."""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
import pytest

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import rollout_pb2 as rpb
from model_manager.plans import CanaryStep, RolloutSpec, Strategy
from model_manager.registry import Registry
from model_manager.rollout import Rollout
from model_manager.rollout_store import AuditRow, RolloutStore, StoredDeployment
from tests.model_manager.registry_support import database_url, postgres_server
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

__all__ = ["database_url", "postgres_server"]


def gate(percent: float) -> rpb.CanaryStep:
    return rpb.CanaryStep(traffic_percent=percent, pause=True)


async def test_a_manager_restarted_mid_rollout_resumes_where_it_was(tmp_path: Path) -> None:
    fleet = LocalFleet()  # the predictors outlive the manager
    first_hub = LocalHub()
    async with manager(tmp_path, fleet, first_hub) as (mm, stub):
        assert mm.registry is not None
        model = make_model(mm.registry)
        rid = (
            await stub.DeployModelVersion(
                pb.DeployModelVersionRequest(model_name=model, version=2, strategy=canary(gate(30)))
            )
        ).rollout.rollout_id
        before = await wait_for(status(stub, rid), lambda r: r.state == rpb.ROLLOUT_STATE_PAUSED)
        assert first_hub.weights(model) == {"1": 7000, "2": 3000}
    last_revision = first_hub.table.revision

    second_hub = LocalHub()  # a gateway that lost nothing, and a hub the manager seeds with its last table
    async with manager(tmp_path, fleet, second_hub) as (mm, stub):
        assert second_hub.seeded is not None, "the last table is served again"
        assert second_hub.seeded.revision == last_revision
        assert second_hub.seeded.routes == first_hub.table.routes
        assert second_hub.seeded.metrics == first_hub.table.metrics
        after = (await stub.GetRolloutStatus(pb.GetRolloutStatusRequest(model_name=model))).rollout
        assert after.rollout_id == rid
        assert after.state == rpb.ROLLOUT_STATE_PAUSED
        assert after.revision == before.revision, (before.events, after.events, before.message, after.message)
        assert [e.type for e in after.events] == [e.type for e in before.events]
        assert second_hub.weights(model) == {"1": 7000, "2": 3000}, "the step's weights are served again"

        await stub.ResumeRollout(pb.ResumeRolloutRequest(rollout_id=rid, reason="go on"))
        done = await wait_for(status(stub, rid), lambda r: r.state == rpb.ROLLOUT_STATE_SUCCEEDED)
        # The paused step's table was not published again: the first revision after the restart is the next step's,
        # one above the last before it (revisions grow across restarts).
        first = second_hub.published[0]
        assert first.revision == last_revision + 1
        assert {v.version: v.weight for v in first.route(model).versions} != {"1": 7000, "2": 3000}
        assert done.revision > before.revision
        # The kept-warm baseline leaves the table (as the fallback) once the rollout is done.
        await wait_for(status(stub, rid), lambda r: second_hub.weights(model) == {"2": 10000})
        assert mm.registry is not None
        assert mm.registry.get_model(model).production_version == 2


async def test_report_metrics_counts_a_window_once_across_retries_and_restarts(tmp_path: Path) -> None:
    fleet = LocalFleet()
    async with manager(tmp_path, fleet, LocalHub()) as (mm, stub):
        assert mm.registry is not None
        model = make_model(mm.registry)
        rid = (
            await stub.DeployModelVersion(
                pb.DeployModelVersionRequest(model_name=model, version=2, strategy=canary(gate(10)))
            )
        ).rollout.rollout_id
        rev = (await wait_for(status(stub, rid), applied)).applied_revision
        good = window(model, 2, rev, {"OK": 10}, wid="gw-1/w-1")
        bad = window(model, 2, rev, {"TEAPOT": 1}, wid="gw-1/w-2")
        first = await stub.ReportMetrics(pb.ReportMetricsRequest(gateway_id="gw-1", windows=[good, bad]))
        assert (first.accepted_windows, first.duplicate_windows) == (1, 0)
        assert len(first.rejected) == 1
        assert first.rejected[0].startswith("gw-1/w-2: status_counts")
        retry = await stub.ReportMetrics(pb.ReportMetricsRequest(gateway_id="gw-1", windows=[good]))
        assert (retry.accepted_windows, retry.duplicate_windows) == (0, 1)
        assert mm.controller is not None
        assert mm.controller.ledger.merged(model, 2).requests == 10
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ReportMetrics(pb.ReportMetricsRequest(windows=[good]))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "gateway_id" in (refused.value.details() or "")

    async with manager(tmp_path, fleet, LocalHub()) as (mm, stub):
        again = await stub.ReportMetrics(pb.ReportMetricsRequest(gateway_id="gw-1", windows=[good]))
        assert (again.accepted_windows, again.duplicate_windows) == (0, 1), "the ledger is rebuilt from the database"
        assert mm.controller is not None
        assert mm.controller.ledger.merged(model, 2).requests == 10


def _spec(model: str) -> RolloutSpec:
    return RolloutSpec(model, 2, 1, Strategy.CANARY, steps=(CanaryStep(10.0), CanaryStep(50.0)))


def test_store_round_trips_rollouts_deployments_windows_and_revisions(database_url: str) -> None:
    registry = Registry.open(database_url)
    try:
        store = RolloutStore(registry.engine)
        clock = iter(float(t) for t in range(1000, 2000)).__next__
        model = f"m-{uuid.uuid4().hex[:8]}"
        rollout = Rollout.start("ro-1", _spec(model), 3, clock)
        audit = AuditRow("alice", "rollout.created", model, 2, "nightly", {"rollout_id": "ro-1"})
        assert store.save(rollout.to_dict(), pending_unload=False, audit_rows=[audit], initiated_by="alice") == 1
        rollout.loaded_version(2)
        assert store.save(rollout.to_dict(), pending_unload=True) == 2
        got = store.get("ro-1")
        assert Rollout.from_dict(got.data, clock).to_dict() == rollout.to_dict()
        assert (got.revision, got.initiated_by) == (2, "alice")
        assert [s.data["rollout_id"] for s in store.latest_per_model() if s.data["spec"]["model"] == model] == ["ro-1"]
        assert "ro-1" in [s.data["rollout_id"] for s in store.live(["SUCCEEDED"])]
        assert [s.data["rollout_id"] for s in store.page(model, ["PROGRESSING"]).items] == ["ro-1"]
        assert registry.list_audit(model).items[0].identity == "alice"
        later = Rollout.start("ro-2", _spec(model), 4, clock)
        store.save(later.to_dict(), pending_unload=False)
        first = store.page(model, page_size=1)
        assert [s.data["rollout_id"] for s in first.items] == ["ro-2"], "newest first"
        second = store.page(model, page_size=1, page_token=first.next_page_token)
        assert [s.data["rollout_id"] for s in second.items] == ["ro-1"]
        assert second.next_page_token == ""

        row = StoredDeployment(model, b"", 1, "ro-1", "alice", 5)
        assert store.put_deployment(row, 0)
        assert not store.put_deployment(row, 0), "a second first generation loses"
        assert not store.put_deployment(StoredDeployment(model, b"", 2, "ro-1", "bob", 6), 7)
        assert store.put_deployment(StoredDeployment(model, b"", 2, "ro-1", "bob", 6), 1)
        stored = store.deployment(model)
        assert stored is not None
        assert (stored.generation, stored.updated_by) == (2, "bob")

        w = {"window_id": "w-1", "model": model, "version": 2, "end": 1500.0, "x": 1}
        assert store.add_windows([w]) == 1
        assert store.add_windows([w]) == 0
        assert [x["window_id"] for x in store.windows_since(1000.0)] == ["w-1"]
        assert store.prune_windows(1500.0) == 1

        store.set_route_revision(7)
        store.set_route_revision(5)
        assert store.route_revision() == 7

        assert store.route_table() is None
        store.set_route_table(8, b"table 8")
        store.set_route_table(6, b"table 6")  # behind the recorded revision: nothing changes
        assert (store.route_revision(), store.route_table()) == (8, (8, b"table 8"))
        store.set_route_table(9, b"table 9")
        assert (store.route_revision(), store.route_table()) == (9, (9, b"table 9"))
    finally:
        registry.close()
