"""Which fallback, static answer and score bins a model's route carries (route_builder), without servers."""

from __future__ import annotations

from model_manager.plans import CanaryStep, RolloutSpec, Route, Strategy
from model_manager.rollout import Rollout
from model_manager.route_builder import Desired, ModelServing, model_route, wanted
from model_manager.routes import Endpoint

ANSWER = (("probability", (0.5, 0.5)),)


def warm_on(*versions: int):  # type: ignore[no-untyped-def]
    def endpoints(model: str, version: int) -> tuple[Endpoint, ...]:
        return (Endpoint("10.0.0.1", 8000 + version),) if version in versions else ()

    return endpoints


def canary_of(model: str) -> Rollout:
    spec = RolloutSpec(model=model, version=2, baseline=1, strategy=Strategy.CANARY, steps=(CanaryStep(10.0),))
    return Rollout.start("ro-1", spec, 1, lambda: 1000.0)


def test_a_configured_fallback_is_kept_loaded_and_the_static_answer_rides_along() -> None:
    (d,) = wanted({"m": ModelServing(production=1, fallback=3, static_answer=ANSWER)}, [])
    assert (d.fallback, d.keep_fallback, d.kept()) == (3, True, {1, 3})
    route = model_route(d, warm_on(1, 3))
    assert route is not None
    assert route.fallback == "3"
    assert {v.version: v.weight for v in route.versions} == {"1": 10000, "3": 0}
    assert route.static_answer == ANSWER


def test_without_configuration_production_alone_has_no_fallback() -> None:
    (d,) = wanted({"m": ModelServing(production=1)}, [])
    assert (d.fallback, d.kept()) == (None, {1})


def test_an_active_canary_falls_back_to_its_baseline_unless_one_is_configured() -> None:
    (d,) = wanted({"m": ModelServing(production=1)}, [canary_of("m")])
    assert (d.fallback, d.keep_fallback, d.scored) == (1, False, 2)
    (configured,) = wanted({"m": ModelServing(production=1, fallback=3)}, [canary_of("m")])
    assert (configured.fallback, configured.keep_fallback) == (3, True)
    assert 3 in configured.kept()


def test_a_fallback_warm_nowhere_is_left_out_of_the_route() -> None:
    d = Desired("m", Route({1: 100.0}, {}), 1, 3, keep_fallback=True)
    route = model_route(d, warm_on(1))
    assert route is not None
    assert route.fallback == ""
    assert [v.version for v in route.versions] == ["1"]


def test_score_bins_are_carried_as_given() -> None:
    d = Desired("m", Route({1: 100.0}, {}), 1, score_output="probability", score_bounds=(0.25, 0.5, 0.75))
    route = model_route(d, warm_on(1))
    assert route is not None
    assert (route.score_output, route.score_bounds) == ("probability", (0.25, 0.5, 0.75))
