"""The route table codec: what the manager encodes, the gateway decodes to the same table; updates
carry only what changed and apply only to the revision they are based on."""

from __future__ import annotations

import pytest

from fresco.api.models.v1 import routing_pb2
from model_manager import route_codec
from model_manager.routes import Endpoint, MetricsConfig, ModelRoute, RouteError, RouteTable, Shadow, VersionRoute

A = Endpoint("10.0.0.1", 8001, "zone-a")
B = Endpoint("10.0.0.2", 8001)


def route(model: str = "fraud", v1: int = 90, v2: int = 10, **extra: object) -> ModelRoute:
    versions = (VersionRoute("1", v1, (A, B), "fraud-pred"), VersionRoute("2", v2, (B,)))
    return ModelRoute(model, versions, "seed", **extra)  # type: ignore[arg-type]


def test_a_table_survives_the_wire() -> None:
    table = RouteTable(
        7,
        (
            route(shadow=Shadow("2", 0.25), fallback="1", score_output="probabilities", score_bounds=(0.1, 0.5, 0.9)),
            route("churn", active_rollout_id="r-1", static_answer=(("probabilities", (0.5, 0.5)), ("label", 0))),
        ),
        MetricsConfig((5.0, 50.0), 2.0),
    )
    message = route_codec.table_message(table, changed_at={"fraud": 6})
    decoded = route_codec.route_table(routing_pb2.RouteTable.FromString(message.SerializeToString()))
    assert decoded == table
    fraud = next(r for r in message.routes if r.model_name == "fraud")
    assert fraud.revision == 6
    assert fraud.shadows[0].mirror_percent == 25.0
    assert fraud.fallback.version == 1
    assert fraud.targets[0].endpoints[0].labels["zone"] == "zone-a"
    churn = next(r for r in message.routes if r.model_name == "churn")
    assert list(churn.static_fallback.outputs["probabilities"].double_list.values) == [0.5, 0.5]
    assert churn.static_fallback.outputs["label"].int64_value == 0
    assert not fraud.HasField("static_fallback")


def test_a_kept_table_reads_back_with_when_each_route_changed() -> None:
    table = RouteTable(9, (route(shadow=Shadow("2", 0.1), fallback="1"), route("churn")), MetricsConfig((5.0,), 2.0))
    kept = route_codec.kept_table(table, {"fraud": 4})
    assert route_codec.read_kept_table(kept) == (table, {"fraud": 4, "churn": 9})
    with pytest.raises(RouteError, match="kept route table"):
        route_codec.read_kept_table(b"\xff not a message")


def test_a_static_answer_takes_numbers_strings_and_their_lists_only() -> None:
    names = (("b", "x"), ("a", (1, 2.5)), ("c", b"raw"), ("d", ("p", "q")))
    assert [n for n, _ in route(static_answer=names).static_answer] == ["a", "b", "c", "d"]
    with pytest.raises(RouteError, match=r"static_answer\[mixed\]: expected"):
        route(static_answer=(("mixed", (1, "x")),))
    with pytest.raises(RouteError, match=r"static_answer\[empty\]: expected"):
        route(static_answer=(("empty", ()),))
    with pytest.raises(RouteError, match="distinct non-empty output names"):
        route(static_answer=(("a", 1), ("a", 2)))


def test_a_shadow_or_fallback_outside_the_targets_joins_them_at_weight_zero() -> None:
    message = route_codec.route_message(route(), 3)
    message.shadows.add(version=9, mirror_percent=50.0, endpoints=[routing_pb2.PredictorEndpoint(address="10.0.0.9:1")])
    decoded = route_codec.model_route(message)
    assert decoded.version("9").weight == 0
    assert decoded.shadow == Shadow("9", 0.5)
    assert decoded.total_weight == 100


def test_a_route_the_gateway_cannot_serve_names_the_field() -> None:
    message = route_codec.route_message(route(), 3)
    message.targets[1].endpoints.add(address="gateway.example:80")
    with pytest.raises(RouteError, match=r"routes\[fraud\]\.targets\[1\]\.endpoints\[1\]"):
        route_codec.model_route(message)
    with pytest.raises(RouteError, match="registry version number"):
        route_codec.route_message(ModelRoute("m", (VersionRoute("v2", 1, (A,)),), "s"), 1)


def test_an_update_carries_only_changes_and_applies_to_its_base() -> None:
    old = RouteTable(4, (route(), route("churn")))
    new = RouteTable(5, (route(v1=50, v2=50), route("ads")))
    update = route_codec.update_message(old, new)
    assert (update.base_revision, update.revision) == (4, 5)
    assert sorted(r.model_name for r in update.upserted_routes) == ["ads", "fraud"]
    assert list(update.removed_model_names) == ["churn"]
    assert not update.HasField("metrics")
    assert route_codec.apply_update(old, update) == new

    watched = route_codec.update_message(old, new, models={"churn"})
    assert list(watched.upserted_routes) == []
    assert list(watched.removed_model_names) == ["churn"]

    with pytest.raises(RouteError, match=r"base_revision: expected 5 .*got 4"):
        route_codec.apply_update(new, update)
