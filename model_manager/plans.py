"""Rollout specs and the plans they expand to: each strategy is an ordered list of traffic phases."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from model_manager.analysis import AnalysisSpec


class Strategy(enum.Enum):
    """How a version is brought into service."""

    BLUE_GREEN = "blue_green"
    CANARY = "canary"
    SHADOW = "shadow"


@dataclass(frozen=True)
class CanaryStep:
    """One canary level: live traffic share, minimum time held, optional mirror share, optional manual gate, and
    the judged samples it needs before it completes."""

    weight: float
    dwell: float = 0.0
    mirror: float = 0.0
    pause_after: bool = False
    min_samples: int = 0


@dataclass(frozen=True)
class RolloutSpec:
    """The desired rollout of one model version; times are in seconds, shares in percent."""

    model: str
    version: int
    baseline: int | None
    strategy: Strategy
    steps: tuple[CanaryStep, ...] = ()
    mirror_percent: float = 0.0
    shadow_duration: float = 0.0
    keep_previous_for: float = 0.0
    analysis: AnalysisSpec | None = None
    # As the wire's default for canaries: blue-green and shadow have no field for it, and a step inconclusive at the end
    # of its dwell is looked at again only after this long.
    analysis_interval: float = 10.0
    inconclusive_limit: float = 1800.0
    failure_limit: int = 1
    auto_rollback: bool = True
    ack_timeout: float = 30.0
    # Blue-green only: the least time the new version is warm before the switch, and a pause for a person there.
    warmup: float = 0.0
    manual_switch: bool = False
    # Roll back when the new version has had no healthy endpoint for longer than the grace period.
    on_unhealthy: bool = False
    unhealthy_grace: float = 30.0

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model: expected a model name")
        if self.version <= 0:
            raise ValueError("version: expected a positive version number")
        if self.baseline is not None and (self.baseline <= 0 or self.baseline == self.version):
            raise ValueError("baseline: expected a positive version other than the one rolled out")
        if self.baseline is None and self.strategy is not Strategy.BLUE_GREEN:
            raise ValueError(f"baseline: a {self.strategy.value} rollout needs a baseline version serving")
        for name in ("shadow_duration", "keep_previous_for", "inconclusive_limit", "warmup"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0.0):
                raise ValueError(f"{name}: expected a finite number of seconds, at least 0")
        for name in ("analysis_interval", "ack_timeout", "unhealthy_grace"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0.0):
                raise ValueError(f"{name}: expected a finite positive number of seconds")
        if self.failure_limit < 1:
            raise ValueError("failure_limit: expected at least 1")
        if self.strategy is Strategy.CANARY:
            if not self.steps:
                raise ValueError("steps: a canary needs at least one step")
            last = 0.0
            for i, s in enumerate(self.steps):
                if not (0.0 < s.weight <= 100.0 and s.weight >= last):
                    raise ValueError(f"steps[{i}].weight: expected a share in (0, 100], not below the previous step")
                if not 0.0 <= s.mirror <= 100.0:
                    raise ValueError(f"steps[{i}].mirror: expected a share in [0, 100]")
                if not (math.isfinite(s.dwell) and s.dwell >= 0.0):
                    raise ValueError(f"steps[{i}].dwell: expected a finite number of seconds, at least 0")
                if s.min_samples < 0:
                    raise ValueError(f"steps[{i}].min_samples: expected a count of at least 0")
                last = s.weight
        elif self.steps:
            raise ValueError(f"steps: only a canary has steps, not a {self.strategy.value} rollout")
        if self.strategy is not Strategy.BLUE_GREEN and (self.warmup or self.manual_switch):
            raise ValueError(f"warmup: only a blue-green switch warms up, not a {self.strategy.value} rollout")
        if self.strategy is Strategy.SHADOW and not 0.0 < self.mirror_percent <= 100.0:
            raise ValueError("mirror_percent: expected a share in (0, 100] for a shadow rollout")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        d = asdict(self)
        d["strategy"] = self.strategy.value
        d["analysis"] = None if self.analysis is None else self.analysis.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RolloutSpec:
        """The inverse of `to_dict`; unknown fields are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"rollout: unknown field {unknown[0]!r}")
        args = dict(d)
        try:
            args["strategy"] = Strategy(d["strategy"])
        except (KeyError, ValueError):
            raise ValueError("strategy: expected one of blue_green, canary, shadow") from None
        args["steps"] = tuple(CanaryStep(**s) for s in d.get("steps", ()))
        if d.get("analysis") is not None:
            args["analysis"] = AnalysisSpec.from_dict(d["analysis"])
        return cls(**args)


@dataclass(frozen=True)
class Route:
    """Live traffic shares and mirror shares per version, in percent."""

    weights: Mapping[int, float]
    mirror: Mapping[int, float]

    def versions(self) -> set[int]:
        """Versions that receive live or mirrored traffic."""
        return {v for v, w in self.weights.items() if w > 0} | {v for v, w in self.mirror.items() if w > 0}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (version keys become strings)."""
        return {
            "weights": {str(k): v for k, v in self.weights.items()},
            "mirror": {str(k): v for k, v in self.mirror.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Route:
        """The inverse of `to_dict`."""
        return cls(
            {int(k): float(v) for k, v in d["weights"].items()}, {int(k): float(v) for k, v in d["mirror"].items()}
        )


@dataclass(frozen=True)
class Phase:
    """One traffic level of a plan: the route it publishes, how long it is held, and how it is judged."""

    name: str
    weight: float
    mirror: float
    dwell: float
    analysed: bool
    pause_after: bool = False
    min_samples: int = 0

    def route(self, spec: RolloutSpec) -> Route:
        """The route of this phase: the candidate's shares, the rest to the baseline."""
        weights = {spec.version: self.weight}
        if spec.baseline is not None:
            weights[spec.baseline] = 100.0 - self.weight
        return Route(
            {v: w for v, w in weights.items() if w > 0}, {spec.version: self.mirror} if self.mirror > 0 else {}
        )

    @property
    def mirrored(self) -> bool:
        """The candidate only sees mirrored traffic, so it is judged on its mirrored windows."""
        return self.weight == 0 and self.mirror > 0


def plan(spec: RolloutSpec) -> tuple[Phase, ...]:
    """The phases a spec goes through, in order; the last one leaves the final route in place."""
    analysed = spec.analysis is not None
    if spec.strategy is Strategy.BLUE_GREEN:
        # The switch phase lasts the keep-warm window: the old version stays loaded, so a rollback is one route flip.
        return (Phase("switch", 100.0, 0.0, spec.keep_previous_for, analysed),)
    if spec.strategy is Strategy.SHADOW:
        return (
            Phase(f"shadow {spec.mirror_percent:g}%", 0.0, spec.mirror_percent, spec.shadow_duration, analysed),
            Phase("stop mirroring", 0.0, 0.0, 0.0, False),
        )
    # A step with its own sample minimum is judged even without thresholds: it completes only once counted.
    phases = [
        Phase(
            f"canary {s.weight:g}%",
            s.weight,
            s.mirror,
            s.dwell,
            analysed or s.min_samples > 0,
            s.pause_after,
            s.min_samples,
        )
        for s in spec.steps
    ]
    if spec.steps[-1].weight < 100.0:
        phases.append(Phase("full", 100.0, 0.0, spec.keep_previous_for, analysed))
    return tuple(phases)


def rollback_route(spec: RolloutSpec) -> Route:
    """All live traffic back on the baseline, no mirroring (no version at all when there is no baseline)."""
    return Route({spec.baseline: 100.0} if spec.baseline is not None else {}, {})
