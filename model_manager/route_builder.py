"""The route table the manager publishes: each model's production version, or its rollout's weights, on warm replicas.

Weights are integers summing to 10000 (basis points), the baseline listed first so the sticky split only moves
units from baseline to canary as the canary's weight grows; the split seed is fixed per model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from model_manager.actions import ACTIVE, State
from model_manager.plans import Route
from model_manager.rollout import Rollout
from model_manager.routes import Endpoint, MetricsConfig, ModelRoute, RouteTable, Shadow, VersionRoute

TOTAL_WEIGHT = 10_000
EndpointsOf = Callable[[str, int], tuple[Endpoint, ...]]
NameOf = Callable[[str, int], str]


def _same_name(model: str, version: int) -> str:
    return ""  # the route's model name, with the version number in ModelInfer


@dataclass(frozen=True)
class Desired:
    """What one model should serve: live and mirror shares in percent, the version listed first, the fallback."""

    model: str
    route: Route
    baseline: int | None = None
    fallback: int | None = None
    rollout_id: str = ""


def split_seed(model: str) -> str:
    """The model's split seed: the same in every revision, so a unit stays on its version."""
    return f"split:{model}"


def basis_points(route: Route, order: list[int]) -> dict[int, int]:
    """Live shares in percent as integer weights summing to 10000; the first listed version takes the rounding."""
    live = [v for v in order if route.weights.get(v, 0.0) > 0]
    if not live:
        return {}
    points = {v: round(route.weights[v] * TOTAL_WEIGHT / 100.0) for v in live[1:]}
    points[live[0]] = TOTAL_WEIGHT - sum(points.values())
    return points


def model_route(desired: Desired, endpoints: EndpointsOf, names: NameOf = _same_name) -> ModelRoute | None:
    """One model's route on the replicas where its versions are warm; None when no live version has one."""
    route = desired.route
    versions = set(route.versions())
    if desired.fallback is not None:
        versions.add(desired.fallback)
    order = sorted(versions, key=lambda v: (v != desired.baseline, v))
    points = basis_points(route, order)
    warm = {v: endpoints(desired.model, v) for v in order}
    # A version with no warm replica keeps its place in the order (the split stays put) but gets no traffic.
    entries = [
        VersionRoute(str(v), points.get(v, 0) if warm[v] else 0, warm[v], predictor_model_name=names(desired.model, v))
        for v in order
    ]
    entries = [e for e in entries if e.weight > 0 or e.endpoints]
    if not entries or sum(e.weight for e in entries) == 0:
        return None
    shadow = None
    mirrored = [v for v in order if route.mirror.get(v, 0.0) > 0 and warm[v]]
    if mirrored:
        shadow = Shadow(str(mirrored[0]), min(route.mirror[mirrored[0]] / 100.0, 1.0))
    fallback = ""
    if desired.fallback is not None and warm.get(desired.fallback):
        fallback = str(desired.fallback)
    return ModelRoute(
        desired.model,
        tuple(entries),
        split_seed(desired.model),
        shadow=shadow,
        fallback=fallback,
        active_rollout_id=desired.rollout_id,
    )


def wanted(production: Mapping[str, int], latest: Iterable[Rollout]) -> list[Desired]:
    """Each model's wanted route: its active rollout's (the baseline as fallback), else its production version's.

    `latest` holds each model's most recent rollout. A finished one's final route stands while production is one
    of its two versions, so a success never flips back before the registry has recorded it.
    """
    out = {model: Desired(model, Route({version: 100.0}, {}), version) for model, version in production.items()}
    for r in latest:
        spec = r.spec
        if r.state in ACTIVE or r.state is State.ROLLING_BACK:
            out[spec.model] = Desired(spec.model, r.route(), spec.baseline, spec.baseline, r.rollout_id)
        elif r.route().weights and (spec.model not in out or out[spec.model].baseline in (spec.version, spec.baseline)):
            out[spec.model] = Desired(spec.model, r.route(), spec.baseline)
    return list(out.values())


def build_table(
    revision: int,
    desired: Iterable[Desired],
    endpoints: EndpointsOf,
    names: NameOf = _same_name,
    metrics: MetricsConfig | None = None,
) -> RouteTable:
    """The table of every model that has a version to serve, each version under the name its replicas serve it by."""
    routes = [r for d in desired if (r := model_route(d, endpoints, names)) is not None]
    return RouteTable(revision, tuple(routes), **({} if metrics is None else {"metrics": metrics}))
