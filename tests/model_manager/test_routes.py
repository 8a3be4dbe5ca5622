"""The route table: valid by construction, immutable, with errors that name the field."""

from __future__ import annotations

import dataclasses

import pytest

from chassis.errors import InvalidArgument, NotFound
from model_manager.routes import (
    MAX_TOTAL_WEIGHT,
    Endpoint,
    ModelRoute,
    RouteError,
    RouteTable,
    Shadow,
    UnknownRoute,
    VersionRoute,
)

A = Endpoint.parse("10.0.0.1:8001")
B = Endpoint.parse("10.0.0.2:8001", zone="b")


def route(**changes: object) -> ModelRoute:
    fields: dict[str, object] = {
        "model": "fraud",
        "versions": (VersionRoute("v1", 90, (A,)), VersionRoute("v2", 10, (B,))),
        "split_seed": "seed",
    }
    fields.update(changes)
    return ModelRoute(**fields)  # type: ignore[arg-type]


def test_endpoint_parses_ipv4_and_bracketed_ipv6() -> None:
    assert Endpoint.parse("10.0.0.7:8001") == Endpoint("10.0.0.7", 8001)
    six = Endpoint.parse("[fd00:0::7]:9000", zone="z")
    assert (six.host, six.port, six.zone) == ("fd00::7", 9000, "z")
    assert six.address == "[fd00::7]:9000"
    assert Endpoint.parse("10.0.0.7:8001").address == "10.0.0.7:8001"


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.0.0.7", "expected IP:port"),
        ("host.local:80", "expected an IPv4 or IPv6 literal, got 'host.local'"),
        ("fd00::7:80", "needs brackets"),
        ("10.0.0.7:0", "port: expected an integer in 1..65535, got 0"),
        ("10.0.0.7:70000", "port: expected an integer in 1..65535, got 70000"),
        ("10.0.0.7:http", "expected IP:port"),
    ],
)
def test_bad_endpoints_are_refused_naming_the_problem(address: str, expected: str) -> None:
    with pytest.raises(RouteError, match=expected.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        Endpoint.parse(address)


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: VersionRoute("v 1", 1, (A,)), "version: expected 1-128 letters"),
        (lambda: VersionRoute("v1", -1, (A,)), r"versions\[v1\]\.weight: expected an integer in 0\.\."),
        (lambda: VersionRoute("v1", 1.5, (A,)), r"versions\[v1\]\.weight"),
        (lambda: VersionRoute("v1", True, (A,)), r"versions\[v1\]\.weight"),
        (lambda: VersionRoute("v1", 5, ()), r"versions\[v1\]\.endpoints: a version with weight 5 needs at least one"),
        (lambda: VersionRoute("v1", 1, (A, Endpoint("10.0.0.1", 8001))), "10.0.0.1:8001 is listed twice"),
        (lambda: route(model="fraud/x"), "model: expected 1-128 letters"),
        (lambda: route(versions=()), r"routes\[fraud\]\.versions: expected at least one version"),
        (
            lambda: route(versions=(VersionRoute("v1", 1, (A,)), VersionRoute("v1", 1, (B,)))),
            "version 'v1' is listed twice",
        ),
        (
            lambda: route(versions=(VersionRoute("v1", 0, (A,)),)),
            r"expected weights adding up to 1\.\.4294967295, got 0",
        ),
        (
            lambda: route(versions=(VersionRoute("v1", MAX_TOTAL_WEIGHT, (A,)), VersionRoute("v2", 1, (B,)))),
            "adding up to 1..4294967295, got 4294967296",
        ),
        (lambda: route(split_seed=""), r"routes\[fraud\]\.split_seed: expected a non-empty string"),
        (lambda: route(fallback="v9"), r"routes\[fraud\]\.fallback: expected one of the route's versions"),
        (lambda: route(shadow=Shadow("v9", 0.1)), r"shadow\.version: expected one of"),
        (lambda: route(shadow=Shadow("v2", 0.0)), r"shadow\.share: expected a fraction in \(0, 1\], got 0\.0"),
        (lambda: route(shadow=Shadow("v2", 1.5)), r"shadow\.share"),
        (
            lambda: route(versions=(VersionRoute("v1", 1, (A,)), VersionRoute("v2", 0)), fallback="v2"),
            "version 'v2' has no endpoints",
        ),
        (lambda: RouteTable(-1), "revision: expected an integer ≥ 0, got -1"),
        (lambda: RouteTable(1, (route(), route())), "model 'fraud' is listed twice"),
    ],
)
def test_invalid_routes_are_refused_naming_the_field(build, expected: str) -> None:
    with pytest.raises(RouteError, match=expected) as caught:
        build()
    # Route errors are bad input: the chassis maps them to INVALID_ARGUMENT, never INTERNAL.
    assert isinstance(caught.value, InvalidArgument)


def test_weight_zero_version_without_endpoints_is_allowed() -> None:
    # A version being registered or drained takes no traffic and needs no replica yet.
    r = route(versions=(VersionRoute("v1", 1, (A,)), VersionRoute("v2", 0)))
    assert r.total_weight == 1
    assert r.version("v2").endpoints == ()


def test_tables_are_immutable_and_ordered_by_model() -> None:
    table = RouteTable(3, (route(model="zeta"), route(model="alpha")))
    assert table.models == ("alpha", "zeta")
    assert table == RouteTable(3, (route(model="alpha"), route(model="zeta")))
    with pytest.raises(dataclasses.FrozenInstanceError):
        table.revision = 4  # type: ignore[misc]
    # Sequences given as lists are kept as tuples, so nothing reachable from a table can change.
    version = VersionRoute("v1", 1, [A, B])  # type: ignore[arg-type]
    assert version.endpoints == (A, B)
    assert isinstance(ModelRoute("m", [version], "s").versions, tuple)  # type: ignore[arg-type]


def test_lookups_of_unknown_models_and_versions_are_not_found() -> None:
    table = RouteTable(1, (route(),))
    assert table.route("fraud").version("v2").weight == 10
    with pytest.raises(UnknownRoute, match="no route for model 'churn' at revision 1") as caught:
        table.route("churn")
    assert isinstance(caught.value, NotFound)
    with pytest.raises(UnknownRoute, match="model 'fraud' has no version 'v3'"):
        table.route("fraud").version("v3")


def test_with_weights_keeps_the_version_order_and_other_fields() -> None:
    before = route(shadow=Shadow("v2", 0.5), fallback="v1")
    after = before.with_weights({"v1": 50, "v2": 50})
    assert [(v.version, v.weight) for v in after.versions] == [("v1", 50), ("v2", 50)]
    assert (after.split_seed, after.shadow, after.fallback) == (before.split_seed, before.shadow, before.fallback)
    assert before.version("v1").weight == 90  # the old route is unchanged
    with pytest.raises(RouteError, match="no version 'v3' to weigh"):
        before.with_weights({"v3": 1})


def test_with_routes_makes_a_later_revision() -> None:
    table = RouteTable(1, (route(), route(model="churn")))
    later = table.with_routes(2, [route().with_weights({"v1": 0, "v2": 100})])
    assert later.revision == 2
    assert later.route("fraud").version("v2").weight == 100
    assert later.route("churn") == table.route("churn")
    with pytest.raises(RouteError, match="revision: expected more than the current 1, got 1"):
        table.with_routes(1, [])
