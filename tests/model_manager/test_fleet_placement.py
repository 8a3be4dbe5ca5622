"""The fleet's domain: memory-aware, zone-spreading placement, copies that follow request rate, and the soft
membership state with its leases, boot ids and the manager's own recent loads."""

from __future__ import annotations

import pytest

from chassis.errors import InvalidArgument
from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager.loader import Artifact, expected_memory, load_config, predictor_model_name
from model_manager.placement import MIB, Candidate, choose, desired_copies, to_remove
from model_manager.predictors import Copy, Predictors, PredictorState, Report


def test_placement_takes_only_predictors_with_room_and_says_why_others_were_refused() -> None:
    candidates = [Candidate("a", "z1", 50 * MIB), Candidate("b", "z1", 200 * MIB), Candidate("c", "z2", 10 * MIB)]
    placement = choose(candidates, 64 * MIB, 2, held_zones=[])
    assert placement.chosen == ("b",)
    assert placement.refused == {"a": "50.0 MiB free", "c": "10.0 MiB free"}
    message = placement.shortfall(2, 64 * MIB)
    assert "placed 1 of 2 copies needing 64.0 MiB" in message
    assert "a: 50.0 MiB free" in message


def test_placement_spreads_zones_before_choosing_by_room() -> None:
    candidates = [
        Candidate("a1", "a", 900 * MIB),
        Candidate("a2", "a", 800 * MIB),
        Candidate("b1", "b", 100 * MIB),
        Candidate("c1", "c", 300 * MIB),
    ]
    assert choose(candidates, 64 * MIB, 3, held_zones=[]).chosen == ("a1", "c1", "b1")
    # A zone already holding a copy comes last; ties on room go by id, so equal fleets place alike.
    assert choose(candidates, 64 * MIB, 2, held_zones=["a", "c"]).chosen == ("b1", "a1")
    equal = [Candidate("y", "", 100), Candidate("x", "", 100)]
    assert choose(equal, 1, 1, held_zones=[]).chosen == ("x",)


def test_copies_follow_request_rate_between_replicas_and_max_replicas() -> None:
    # 50 req/s per copy: 170 req/s on 2 copies wants 4, but at most max_replicas.
    assert desired_copies(2, 170.0, 50.0, replicas=2, max_replicas=6) == 4
    assert desired_copies(2, 170.0, 50.0, replicas=2, max_replicas=3) == 3
    # Within the band nothing moves; well below it one copy goes, never under replicas.
    assert desired_copies(3, 120.0, 50.0, replicas=1, max_replicas=6) == 3
    assert desired_copies(3, 60.0, 50.0, replicas=1, max_replicas=6) == 2
    assert desired_copies(2, 0.0, 50.0, replicas=2, max_replicas=6) == 2
    assert desired_copies(0, 500.0, 50.0, replicas=2, max_replicas=6) == 2
    # Scaling down drops from the most crowded zone, the least busy copy first.
    copies = [("a1", "a", 5.0), ("a2", "a", 1.0), ("b1", "b", 0.0)]
    assert to_remove(copies, 1) == ["a2"]
    assert to_remove(copies, 2) == ["a2", "b1"]  # then the zones tie, and the idle copy goes


def test_expected_memory_and_the_load_config() -> None:
    assert expected_memory(1000, rpb.BackendHints(expected_memory_bytes=64 * MIB)) == 64 * MIB
    assert expected_memory(1000, rpb.BackendHints()) == 1000
    assert predictor_model_name("churn", 3) == "churn.v3"
    long = predictor_model_name("m" * 128, 12)
    assert len(long) == 128
    assert long.endswith(".v12")
    assert long != predictor_model_name("m" * 127 + "n", 12)
    config = load_config("churn.v3", Artifact("churn", 3, b"", 10, "onnxruntime", 8))
    assert '"specific": {"versions": [3]}' in config
    assert '"registry_model": {"string_value": "churn"}' in config
    assert '"max_batch_size": 8' in config
    assert '"backend": "onnxruntime"' in config


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def report(pid: str = "p1", boot: str = "b1", healthy: bool = True, copies: tuple[Copy, ...] = ()) -> Report:
    return Report(pid, "127.0.0.1:7001", boot, zone="z", healthy=healthy, memory_capacity_bytes=1000, copies=copies)


def test_a_lease_runs_out_and_the_lost_predictor_must_register_again() -> None:
    clock = Clock()
    fleet = Predictors(lease_s=3.0, settle_s=1.0, forget_s=30.0, clock=clock, wall=clock)
    fleet.register(report())
    clock.now += 2.0
    assert fleet.heartbeat(report())
    clock.now += 2.9
    assert fleet.expire() == []
    clock.now += 0.2
    lost = fleet.expire()
    assert [p.predictor_id for p in lost] == ["p1"]
    assert fleet.ready() == []
    assert not fleet.heartbeat(report())
    registered = fleet.register(report())
    assert registered.state is PredictorState.READY
    clock.now += 31.0
    fleet.expire()
    fleet.expire()
    assert fleet.get("p1") is None


def test_unhealthy_and_restarted_predictors() -> None:
    clock = Clock()
    fleet = Predictors(lease_s=3.0, settle_s=1.0, forget_s=30.0, clock=clock, wall=clock)
    copy = Copy("m.v1", "m", 1, True, 100)
    fleet.register(report(copies=(copy,)))
    assert fleet.heartbeat(report(healthy=False, copies=(copy,)))
    assert fleet.get("p1").state is PredictorState.UNHEALTHY  # type: ignore[union-attr]
    # A heartbeat with another boot id is a restart: register again; registering forgets the old copies.
    assert not fleet.heartbeat(report(boot="b2"))
    again = fleet.register(report(boot="b2"))
    assert again.copies == {}
    assert again.state is PredictorState.READY


def test_the_managers_own_loads_override_heartbeats_for_a_while() -> None:
    clock = Clock()
    fleet = Predictors(lease_s=3.0, settle_s=1.0, forget_s=30.0, clock=clock, wall=clock)
    predictor = fleet.register(report())
    loaded = Copy("m.v1", "m", 1, True, 300)
    fleet.expect_loaded(predictor, loaded)
    assert predictor.free_bytes() == 700
    predictor.reserved["m.v2"] = 200
    assert predictor.free_bytes() == 500
    del predictor.reserved["m.v2"]
    clock.now += 0.5
    fleet.heartbeat(report())  # built before the load answered: the copy stays
    assert predictor.copies == {"m.v1": loaded}
    clock.now += 1.0
    fleet.heartbeat(report())  # past settle_s the predictor's word wins
    assert predictor.copies == {}
    fleet.heartbeat(report(copies=(loaded,)))
    fleet.expect_unloaded(predictor, "m.v1")
    clock.now += 0.5
    fleet.heartbeat(report(copies=(loaded,)))
    assert predictor.copies == {}


def test_listing_pages_by_id() -> None:
    fleet = Predictors(lease_s=3.0, settle_s=1.0, forget_s=30.0)
    for pid in ("c", "a", "b"):
        fleet.register(report(pid))
    first, token = fleet.page(2, "")
    rest, end = fleet.page(2, token)
    assert [p.predictor_id for p in first + rest] == ["a", "b", "c"]
    assert end == ""
    with pytest.raises(InvalidArgument, match="page_token"):
        fleet.page(2, "garbage")
