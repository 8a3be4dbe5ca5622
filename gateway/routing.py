"""Static routing: which predictor endpoints serve which model. The model manager's routing table
replaces this source later; the interface stays."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from chassis.errors import InvalidArgument, NotFound


class RouteConfig(BaseModel):
    """One model's route in the routes file."""

    model_config = ConfigDict(extra="forbid")

    model: str
    predictors: list[str]


class RoutesFile(BaseModel):
    """The routes file: `routes: [{model, predictors}]`."""

    model_config = ConfigDict(extra="forbid")

    routes: list[RouteConfig] = []


@dataclass
class Route:
    """The endpoints that have a model hot, picked round-robin."""

    endpoints: list[str]
    _cycle: Iterator[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise InvalidArgument("a route needs at least one predictor endpoint")
        self._cycle = itertools.cycle(self.endpoints)

    def pick(self) -> str:
        """The next endpoint to send to."""
        return next(self._cycle)


class RouteTable:
    """Model name → route, with a default route for models not named."""

    def __init__(self, routes: dict[str, Route], default: Route | None) -> None:
        self.routes = routes
        self.default = default

    def endpoint_for(self, model: str) -> str:
        """The predictor endpoint to call for a model."""
        route = self.routes.get(model, self.default)
        if route is None:
            raise NotFound(f"model {model!r} has no route; routed models: {sorted(self.routes)}")
        return route.pick()

    @classmethod
    def static(cls, default_predictor: str | None, routes_file: Path | None) -> RouteTable:
        """A table from the gateway's settings."""
        routes: dict[str, Route] = {}
        if routes_file is not None:
            try:
                parsed = RoutesFile.model_validate(yaml.safe_load(routes_file.read_text()) or {})
            except (OSError, yaml.YAMLError, ValidationError) as err:
                raise InvalidArgument(f"routes file {routes_file}: {err}") from None
            routes = {r.model: Route(list(r.predictors)) for r in parsed.routes}
        default = Route([default_predictor]) if default_predictor else None
        return cls(routes, default)
