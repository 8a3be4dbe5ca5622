"""The route table: for each model, its versions' weights and endpoints, the split seed, shadow and
fallback, under one revision. Tables are immutable and valid by construction: a new revision is a
new table, so a gateway or the xDS server can swap one reference and never see half an update."""

from __future__ import annotations

import ipaddress
import itertools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Final

from chassis.errors import InvalidArgument, NotFound
from model_manager.windows import LATENCY_BOUNDS_MS

# Names end up in xDS resource names and in `xds:///<model>` targets, so they stay URI-safe.
_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
NAME_RULE: Final = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
# Envoy and gRPC add a route's cluster weights in a uint32.
MAX_TOTAL_WEIGHT: Final = 2**32 - 1


class RouteError(InvalidArgument):
    """A route table that cannot be served: the message names the field and what was expected."""


class UnknownRoute(NotFound):
    """No route for the model, or no such version in its route."""


def _check_name(where: str, value: object) -> None:
    if not isinstance(value, str) or not _NAME.match(value):
        raise RouteError(f"{where}: expected {NAME_RULE}, got {value!r}")


@dataclass(frozen=True)
class Endpoint:
    """One replica serving a version: an IP literal and a port, and the zone it runs in."""

    host: str
    port: int
    zone: str = ""

    def __post_init__(self) -> None:
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            raise RouteError(f"endpoint host: expected an IPv4 or IPv6 literal, got {self.host!r}") from None
        # One spelling per address, so equal endpoints compare and hash equal.
        object.__setattr__(self, "host", str(ip))
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise RouteError(f"endpoint {self.host} port: expected an integer in 1..65535, got {self.port!r}")
        if not isinstance(self.zone, str):
            raise RouteError(f"endpoint {self.host}:{self.port} zone: expected a string, got {self.zone!r}")

    @classmethod
    def parse(cls, address: str, zone: str = "") -> Endpoint:
        """`10.0.0.7:8001` or `[fd00::7]:8001`."""
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise RouteError(f"endpoint: expected IP:port (IPv6 as [addr]:port), got {address!r}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise RouteError(f"endpoint: an IPv6 address needs brackets, as [addr]:port, got {address!r}")
        return cls(host, int(port), zone)

    @property
    def address(self) -> str:
        """The endpoint as `host:port`, IPv6 in brackets."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class VersionRoute:
    """One version of a model in a route: its integer weight and the warm replicas serving it."""

    version: str
    weight: int
    endpoints: tuple[Endpoint, ...] = ()
    predictor_model_name: str = ""  # the model name the endpoints serve the version under; "" for the route's

    def __post_init__(self) -> None:
        _check_name("version", self.version)
        if self.predictor_model_name:
            _check_name(f"versions[{self.version}].predictor_model_name", self.predictor_model_name)
        where = f"versions[{self.version}]"
        weight = self.weight
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= MAX_TOTAL_WEIGHT:
            raise RouteError(f"{where}.weight: expected an integer in 0..{MAX_TOTAL_WEIGHT}, got {self.weight!r}")
        object.__setattr__(self, "endpoints", tuple(self.endpoints))
        seen: set[tuple[str, int]] = set()
        for endpoint in self.endpoints:
            if not isinstance(endpoint, Endpoint):
                raise RouteError(f"{where}.endpoints: expected Endpoint values, got {endpoint!r}")
            if (endpoint.host, endpoint.port) in seen:
                raise RouteError(f"{where}.endpoints: {endpoint.address} is listed twice")
            seen.add((endpoint.host, endpoint.port))
        if self.weight > 0 and not self.endpoints:
            raise RouteError(f"{where}.endpoints: a version with weight {self.weight} needs at least one endpoint")


@dataclass(frozen=True)
class Shadow:
    """Mirror `share` (0 < share ≤ 1) of a model's requests to `version`, never changing the answer."""

    version: str
    share: float


# A fixed output value of a static answer: a scalar, or a list of numbers or strings.
StaticValue = bool | int | float | str | bytes | tuple[float, ...] | tuple[str, ...]


def _static_answer(where: str, outputs: Iterable[tuple[str, StaticValue]]) -> tuple[tuple[str, StaticValue], ...]:
    checked: dict[str, StaticValue] = {}
    for name, value in outputs:
        if not isinstance(name, str) or not name or name in checked:
            raise RouteError(f"{where}: expected distinct non-empty output names, got {name!r}")
        if isinstance(value, tuple | list):
            strings, numbers = (all(isinstance(v, kind) for v in value) for kind in (str, int | float))
            valid = bool(value) and (strings or numbers)
        else:
            valid = isinstance(value, bool | int | float | str | bytes)
        if not valid:
            raise RouteError(
                f"{where}[{name}]: expected a number, string, bytes, or a non-empty list of numbers or of strings, "
                f"got {value!r}"
            )
        checked[name] = tuple(value) if isinstance(value, list) else value
    # Sorted by name, so the same answer compares equal however it was given.
    return tuple(sorted(checked.items()))


@dataclass(frozen=True)
class ModelRoute:
    """How one model's traffic is split. `versions` keeps a stable order, baseline first: the sticky
    split lays the versions out in this order, so it must not be reshuffled between revisions."""

    model: str
    versions: tuple[VersionRoute, ...]
    split_seed: str
    shadow: Shadow | None = None
    fallback: str = ""  # the version served when the chosen one fails; "" for none
    score_output: str = ""  # the output summarised in score histograms; "" for the first numeric one
    score_bounds: tuple[float, ...] = ()  # upper bounds of the score histogram buckets, increasing
    active_rollout_id: str = ""  # the rollout changing this route; "" for none
    static_answer: tuple[tuple[str, StaticValue], ...] = ()  # outputs answered when no version can serve; () none
    _by_version: Mapping[str, VersionRoute] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_name("model", self.model)
        where = f"routes[{self.model}]"
        object.__setattr__(self, "versions", tuple(self.versions))
        if not self.versions:
            raise RouteError(f"{where}.versions: expected at least one version")
        by_version: dict[str, VersionRoute] = {}
        for version in self.versions:
            if not isinstance(version, VersionRoute):
                raise RouteError(f"{where}.versions: expected VersionRoute values, got {version!r}")
            if version.version in by_version:
                raise RouteError(f"{where}.versions: version {version.version!r} is listed twice")
            by_version[version.version] = version
        object.__setattr__(self, "_by_version", MappingProxyType(by_version))
        total = self.total_weight
        if not 0 < total <= MAX_TOTAL_WEIGHT:
            raise RouteError(f"{where}.versions: expected weights adding up to 1..{MAX_TOTAL_WEIGHT}, got {total}")
        if not isinstance(self.split_seed, str) or not self.split_seed:
            raise RouteError(f"{where}.split_seed: expected a non-empty string, got {self.split_seed!r}")
        if self.shadow is not None:
            self._check_shadow(where, self.shadow)
        if self.fallback:
            self._check_served(f"{where}.fallback", self.fallback)
        object.__setattr__(self, "score_bounds", _increasing(f"{where}.score_bounds", self.score_bounds))
        object.__setattr__(self, "static_answer", _static_answer(f"{where}.static_answer", self.static_answer))

    def _check_shadow(self, where: str, shadow: Shadow) -> None:
        self._check_served(f"{where}.shadow.version", shadow.version)
        share = shadow.share
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0.0 < share <= 1.0:
            raise RouteError(f"{where}.shadow.share: expected a fraction in (0, 1], got {share!r}")

    def _check_served(self, where: str, version: str) -> None:
        known = self._by_version.get(version)
        if known is None:
            known_versions = sorted(self._by_version)
            raise RouteError(f"{where}: expected one of the route's versions {known_versions}, got {version!r}")
        if not known.endpoints:
            raise RouteError(f"{where}: version {version!r} has no endpoints to send requests to")

    @property
    def total_weight(self) -> int:
        """The sum of the versions' weights: a version gets weight/total of the traffic."""
        return sum(v.weight for v in self.versions)

    def version(self, name: str) -> VersionRoute:
        """The named version's route; UnknownRoute if the model's route has no such version."""
        try:
            return self._by_version[name]
        except KeyError:
            raise UnknownRoute(f"model {self.model!r} has no version {name!r} in its route") from None

    def with_weights(self, weights: Mapping[str, int]) -> ModelRoute:
        """The same route with some versions' weights changed (their order, and so the split, kept)."""
        unknown = sorted(set(weights) - set(self._by_version))
        if unknown:
            raise RouteError(f"routes[{self.model}].versions: no version {unknown[0]!r} to weigh")
        return replace(self, versions=tuple(replace(v, weight=weights.get(v.version, v.weight)) for v in self.versions))


def _increasing(where: str, bounds: Iterable[float]) -> tuple[float, ...]:
    values = tuple(bounds)
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise RouteError(f"{where}: expected finite numbers, got {value!r}")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise RouteError(f"{where}: expected strictly increasing bounds, got {list(values)}")
    return tuple(float(v) for v in values)


# The bounds rollout analysis merges gateways' latency histograms over, unless a table says otherwise.
DEFAULT_LATENCY_BOUNDS_MS: Final = LATENCY_BOUNDS_MS
DEFAULT_WINDOW_S: Final = 10.0


@dataclass(frozen=True)
class MetricsConfig:
    """How gateways measure what they report: latency bucket bounds and the window length."""

    latency_bounds_ms: tuple[float, ...] = DEFAULT_LATENCY_BOUNDS_MS
    window_seconds: float = DEFAULT_WINDOW_S

    def __post_init__(self) -> None:
        bounds = _increasing("metrics.latency_bucket_bounds_ms", self.latency_bounds_ms)
        if not bounds or bounds[0] <= 0:
            raise RouteError(f"metrics.latency_bucket_bounds_ms: expected positive bounds, got {list(bounds)}")
        object.__setattr__(self, "latency_bounds_ms", bounds)
        seconds = self.window_seconds
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds <= 3600:
            raise RouteError(f"metrics.window_seconds: expected seconds in (0, 3600], got {seconds!r}")


@dataclass(frozen=True)
class RouteTable:
    """Every model's route under one revision; revisions only grow."""

    revision: int
    routes: tuple[ModelRoute, ...] = ()
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    _by_model: Mapping[str, ModelRoute] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.revision, bool) or not isinstance(self.revision, int) or self.revision < 0:
            raise RouteError(f"revision: expected an integer ≥ 0, got {self.revision!r}")
        if not isinstance(self.metrics, MetricsConfig):
            raise RouteError(f"metrics: expected a MetricsConfig, got {self.metrics!r}")
        by_model: dict[str, ModelRoute] = {}
        for route in self.routes:
            if not isinstance(route, ModelRoute):
                raise RouteError(f"routes: expected ModelRoute values, got {route!r}")
            if route.model in by_model:
                raise RouteError(f"routes: model {route.model!r} is listed twice")
            by_model[route.model] = route
        # Sorted by model, so two tables with the same routes are equal and publish identically.
        object.__setattr__(self, "routes", tuple(by_model[m] for m in sorted(by_model)))
        object.__setattr__(self, "_by_model", MappingProxyType(by_model))

    @property
    def models(self) -> tuple[str, ...]:
        """The routed models' names, sorted."""
        return tuple(r.model for r in self.routes)

    def route(self, model: str) -> ModelRoute:
        """The model's route; UnknownRoute if the table has none."""
        try:
            return self._by_model[model]
        except KeyError:
            raise UnknownRoute(f"no route for model {model!r} at revision {self.revision}") from None

    def with_routes(self, revision: int, routes: Iterable[ModelRoute]) -> RouteTable:
        """A later revision with the given routes added or replaced; the others kept."""
        if revision <= self.revision:
            raise RouteError(f"revision: expected more than the current {self.revision}, got {revision}")
        merged = dict(self._by_model)
        for route in routes:
            merged[route.model] = route
        return RouteTable(revision, tuple(merged.values()), self.metrics)
