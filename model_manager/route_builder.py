"""The route table the manager publishes: each model's production version, or its rollout's weights, on warm replicas.

Weights are integers summing to 10000 (basis points), the baseline listed first so the sticky split only moves
units from baseline to canary as the canary's weight grows; the split seed is fixed per model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from model_manager.actions import ACTIVE, State
from model_manager.plans import Route
from model_manager.rollout import Rollout
from model_manager.routes import (
    Endpoint,
    MetricsConfig,
    ModelRoute,
    RouteTable,
    Shadow,
    StaticValue,
    VersionRoute,
)

TOTAL_WEIGHT = 10_000
EndpointsOf = Callable[[str, int], tuple[Endpoint, ...]]
NameOf = Callable[[str, int], str]


def _same_name(model: str, version: int) -> str:
    return ""  # the route's model name, with the version number in ModelInfer


StaticAnswer = tuple[tuple[str, StaticValue], ...]


@dataclass(frozen=True)
class ModelServing:
    """What the registry and the model's deployment say: its production version, the configured fallback version
    (the deployment's, else the registry model's; 0 for none) and the static answer given when none can serve."""

    production: int = 0
    fallback: int = 0
    static_answer: StaticAnswer = ()
    held: frozenset[int] = frozenset()  # versions held for experiment arms: warm, routed at weight 0


@dataclass(frozen=True)
class Desired:
    """What one model should serve: live and mirror shares in percent, the version listed first, the fallback.

    A configured fallback (`keep_fallback`) is loaded and kept warm; any other (the rollout's baseline, the previous
    production version) is routed to only while it happens to be warm. `scored` is the version whose training
    histogram of `score_output` gives the score bins when the baseline has none.
    """

    model: str
    route: Route
    baseline: int | None = None
    fallback: int | None = None
    rollout_id: str = ""
    keep_fallback: bool = False
    static_answer: StaticAnswer = ()
    scored: int | None = None
    score_output: str = ""
    score_bounds: tuple[float, ...] = ()
    held: frozenset[int] = frozenset()

    def kept(self) -> set[int]:
        """The versions this route keeps loaded: those it routes to, its configured fallback and held versions."""
        out = set(self.route.versions()) | self.held
        if self.keep_fallback and self.fallback is not None:
            out.add(self.fallback)
        return out


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
    versions = set(route.versions()) | desired.held  # held versions: weight 0, reachable by pinned requests only
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
        score_output=desired.score_output,
        score_bounds=desired.score_bounds,
        active_rollout_id=desired.rollout_id,
        static_answer=desired.static_answer,
    )


def wanted(serving: Mapping[str, ModelServing], latest: Iterable[Rollout]) -> list[Desired]:
    """Each model's wanted route: its active rollout's, else its production version's, with its fallback.

    The fallback is the configured one, else an active rollout's baseline, else (after a success) the previous
    production version while it is still warm. `latest` holds each model's most recent rollout. A finished one's
    final route stands while production is one of its two versions, so a success never flips back before the
    registry has recorded it.
    """
    out: dict[str, Desired] = {}
    for model, s in serving.items():
        if s.production:
            out[model] = Desired(
                model, Route({s.production: 100.0}, {}), s.production, fallback=s.fallback or None,
                keep_fallback=bool(s.fallback), static_answer=s.static_answer, scored=s.production, held=s.held,
            )  # fmt: skip
    for r in latest:
        spec = r.spec
        s = serving.get(spec.model, ModelServing())
        output = spec.analysis.score_output if spec.analysis is not None else ""
        base = Desired(spec.model, r.route(), spec.baseline, keep_fallback=bool(s.fallback),
                       static_answer=s.static_answer, scored=spec.version, score_output=output,
                       held=s.held)  # fmt: skip
        if r.state in ACTIVE or r.state is State.ROLLING_BACK:
            out[spec.model] = replace(base, fallback=s.fallback or spec.baseline, rollout_id=r.rollout_id)
        elif r.route().weights and (spec.model not in out or out[spec.model].baseline in (spec.version, spec.baseline)):
            previous = spec.baseline if r.state is State.SUCCEEDED and s.production == spec.version else None
            out[spec.model] = replace(base, fallback=s.fallback or previous)
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
