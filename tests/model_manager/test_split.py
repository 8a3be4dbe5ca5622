"""The sticky weighted split and the rendezvous choice of replica."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from model_manager.routes import Endpoint, ModelRoute, VersionRoute
from model_manager.split import (
    choose_endpoint,
    random_version,
    rendezvous_order,
    split_version,
    sticky_version,
    unit_point,
)

A, B, C = (Endpoint("10.0.0.1", 8001), Endpoint("10.0.0.2", 8001), Endpoint("10.0.0.3", 8001))
UNITS = [f"user-{i}" for i in range(4000)]


def two_way(baseline: int, canary: int, seed: str = "seed-1") -> ModelRoute:
    return ModelRoute("fraud", (VersionRoute("v1", baseline, (A,)), VersionRoute("v2", canary, (B,))), seed)


def assignment(route: ModelRoute) -> dict[str, str]:
    return {unit: sticky_version(route, unit).version for unit in UNITS}


def test_unit_points_are_pinned() -> None:
    # Gateways of every release and any other implementation must put a unit at the same point.
    assert unit_point("user-1", "seed-1") == 12046600104037489727
    assert unit_point("", "s") == 1712518326612644412


@given(
    st.integers(min_value=0, max_value=1000),
    st.integers(min_value=0, max_value=1000),
    st.integers(min_value=0, max_value=1000),
)
def test_raising_the_canary_moves_units_only_from_baseline_to_canary(total: int, canary: int, raise_by: int) -> None:
    total = max(total, 1)
    canary = min(canary, total)
    raised = min(canary + raise_by, total)
    before = assignment(two_way(total - canary, canary))
    after = assignment(two_way(total - raised, raised))
    moves = Counter((before[u], after[u]) for u in UNITS if before[u] != after[u])
    assert set(moves) <= {("v1", "v2")}


def test_shares_follow_the_weights() -> None:
    counts = Counter(assignment(two_way(90, 10)).values())
    # Hashing is deterministic, so these counts are the same on every run; ±1.5 % is over 3 sigma anyway.
    assert 340 <= counts["v2"] <= 460, counts
    assert counts["v1"] + counts["v2"] == len(UNITS)


def test_the_split_depends_on_shares_not_on_the_weights_scale() -> None:
    assert assignment(two_way(1, 1)) == assignment(two_way(500, 500))
    assert assignment(two_way(9, 1)) == assignment(two_way(900, 100))


def test_a_unit_sticks_and_seeds_decorrelate_models() -> None:
    route = two_way(50, 50)
    assert all(sticky_version(route, "user-7") == sticky_version(route, "user-7") for _ in range(5))
    canary_a = {u for u, v in assignment(two_way(50, 50, "seed-a")).items() if v == "v2"}
    canary_b = {u for u, v in assignment(two_way(50, 50, "seed-b")).items() if v == "v2"}
    # Independent halves overlap on about a quarter of the units, not on all of them.
    assert 800 <= len(canary_a & canary_b) <= 1200


def test_weight_zero_versions_get_no_units() -> None:
    route = ModelRoute(
        "fraud", (VersionRoute("v1", 0, (A,)), VersionRoute("v2", 3, (B,)), VersionRoute("v3", 0, (C,))), "s"
    )
    assert set(assignment(route).values()) == {"v2"}


def test_requests_without_a_unit_draw_at_random_by_weight() -> None:
    route = two_way(75, 25)
    rng = random.Random(11)
    counts = Counter(split_version(route, None, rng).version for _ in range(4000))
    assert 850 <= counts["v2"] <= 1150, counts
    assert split_version(route, "user-3", rng) == sticky_version(route, "user-3")
    assert random_version(two_way(0, 1), rng).version == "v2"


def test_rendezvous_order_is_a_permutation_independent_of_input_order() -> None:
    order = rendezvous_order("user-1", [A, B, C])
    assert sorted(order, key=lambda e: e.address) == [A, B, C]
    assert rendezvous_order("user-1", [C, A, B]) == order
    firsts = Counter(rendezvous_order(u, [A, B, C])[0] for u in UNITS)
    assert all(1100 <= n <= 1560 for n in firsts.values()), firsts


def test_removing_a_replica_moves_only_its_keys_and_adding_one_takes_only_keys() -> None:
    before = {u: rendezvous_order(u, [A, B, C])[0] for u in UNITS}
    without_b = {u: rendezvous_order(u, [A, C])[0] for u in UNITS}
    assert all(before[u] == without_b[u] for u in UNITS if before[u] != B)
    d = Endpoint("10.0.0.4", 8001)
    with_d = {u: rendezvous_order(u, [A, B, C, d])[0] for u in UNITS}
    assert all(with_d[u] in (before[u], d) for u in UNITS)


def test_choose_endpoint_fails_over_in_rendezvous_order() -> None:
    order = rendezvous_order("user-9", [A, B, C])
    assert choose_endpoint("user-9", [A, B, C], lambda e: True) == order[0]
    assert choose_endpoint("user-9", [A, B, C], lambda e: e != order[0]) == order[1]
    assert choose_endpoint("user-9", [A, B, C], lambda e: e == order[2]) == order[2]
    assert choose_endpoint("user-9", [A, B, C], lambda e: False) is None
    assert choose_endpoint("user-9", [], lambda e: True) is None
