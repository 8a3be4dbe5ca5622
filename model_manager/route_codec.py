"""Route tables on the wire: `model_manager.routes` values to and from the routing.proto messages,
and a RouteUpdate computed between two tables or applied to one. The manager encodes with it, the
gateway decodes with it: one codec, so both sides read the same table."""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping
from typing import Final

from google.protobuf.message import DecodeError

from fresco.api.common.v1 import values_pb2
from fresco.api.models.v1 import routing_pb2 as pb
from fresco.client import to_value
from model_manager.routes import (
    Endpoint,
    MetricsConfig,
    ModelRoute,
    RouteError,
    RouteTable,
    Shadow,
    StaticValue,
    VersionRoute,
)

# WatchRoutes' opening header: the manager's current revision, sent as soon as it takes the subscription.
REVISION_HEADER: Final = "fresco-route-revision"


def _version_number(where: str, version: str) -> int:
    if not version.isdigit() or int(version) < 1:
        raise RouteError(f"{where}: expected a registry version number (1, 2, ...), got {version!r}")
    return int(version)


def _endpoint_message(endpoint: Endpoint) -> pb.PredictorEndpoint:
    labels = {"zone": endpoint.zone} if endpoint.zone else {}
    return pb.PredictorEndpoint(predictor_id=endpoint.address, address=endpoint.address, labels=labels)


def _endpoints(where: str, messages: Iterable[pb.PredictorEndpoint]) -> tuple[Endpoint, ...]:
    endpoints = []
    for index, message in enumerate(messages):
        try:
            endpoints.append(Endpoint.parse(message.address, message.labels.get("zone", "")))
        except RouteError as err:
            raise RouteError(f"{where}.endpoints[{index}]: {err}") from None
    return tuple(endpoints)


def value_message(value: StaticValue) -> values_pb2.Value:
    """A static answer's value as a `fresco.common.v1.Value` (a tuple as the list of its kind)."""
    return to_value(value)


def static_value(where: str, message: values_pb2.Value) -> StaticValue:
    """A static answer's value from the wire; a null is refused."""
    kind = message.WhichOneof("kind")
    if kind is None:
        raise RouteError(f"{where}: expected a value, got null")
    if kind in ("double_list", "int64_list", "string_list"):
        return tuple(getattr(message, kind).values)
    value: StaticValue = getattr(message, kind)
    return value


def metrics_message(metrics: MetricsConfig) -> pb.MetricsConfig:
    """The wire form of a metrics configuration."""
    return pb.MetricsConfig(latency_bucket_bounds_ms=metrics.latency_bounds_ms, window_seconds=metrics.window_seconds)


def metrics_config(message: pb.MetricsConfig) -> MetricsConfig:
    """A metrics configuration from the wire; empty fields take the defaults."""
    defaults = MetricsConfig()
    return MetricsConfig(
        tuple(message.latency_bucket_bounds_ms) or defaults.latency_bounds_ms,
        message.window_seconds or defaults.window_seconds,
    )


def route_message(route: ModelRoute, revision: int) -> pb.ModelRoute:
    """The wire form of a model's route, `revision` being when it last changed."""
    where = f"routes[{route.model}]"
    message = pb.ModelRoute(
        model_name=route.model,
        revision=revision,
        split_seed=route.split_seed,
        active_rollout_id=route.active_rollout_id,
        score_output=route.score_output,
        score_bucket_bounds=route.score_bounds,
    )
    for version in route.versions:
        message.targets.add(
            version=_version_number(f"{where}.versions[{version.version}]", version.version),
            weight=version.weight,
            predictor_model_name=version.predictor_model_name,
            endpoints=[_endpoint_message(e) for e in version.endpoints],
        )
    if route.shadow is not None:
        shadowed = route.version(route.shadow.version)
        message.shadows.add(
            version=int(shadowed.version),
            mirror_percent=route.shadow.share * 100.0,
            predictor_model_name=shadowed.predictor_model_name,
            endpoints=[_endpoint_message(e) for e in shadowed.endpoints],
        )
    for name, value in route.static_answer:
        message.static_fallback.outputs[name].CopyFrom(value_message(value))
    if route.fallback:
        fallback = route.version(route.fallback)
        message.fallback.version = int(fallback.version)
        message.fallback.predictor_model_name = fallback.predictor_model_name
        message.fallback.endpoints.extend(_endpoint_message(e) for e in fallback.endpoints)
    return message


def model_route(message: pb.ModelRoute) -> ModelRoute:
    """A model's route from the wire; RouteError names the field that is wrong."""
    where = f"routes[{message.model_name}]"
    versions: dict[str, VersionRoute] = {}
    for index, target in enumerate(message.targets):
        name = str(target.version)
        if target.version < 1:
            raise RouteError(f"{where}.targets[{index}].version: expected a version number ≥ 1, got {target.version}")
        if name in versions:
            raise RouteError(f"{where}.targets[{index}].version: version {name} is listed twice")
        endpoints = _endpoints(f"{where}.targets[{index}]", target.endpoints)
        versions[name] = VersionRoute(name, target.weight, endpoints, target.predictor_model_name)

    def extra(field: str, version: int, model_name: str, endpoints: Iterable[pb.PredictorEndpoint]) -> str:
        # A shadow or fallback version not among the targets joins them at weight 0: served, never split to.
        name = str(version)
        if name not in versions:
            versions[name] = VersionRoute(name, 0, _endpoints(f"{where}.{field}", endpoints), model_name)
        return name

    if len(message.shadows) > 1:
        raise RouteError(f"{where}.shadows: expected at most one shadow, got {len(message.shadows)}")
    shadow = None
    for mirrored in message.shadows:
        if not 0.0 < mirrored.mirror_percent <= 100.0:
            raise RouteError(f"{where}.shadows[0].mirror_percent: expected (0, 100], got {mirrored.mirror_percent}")
        name = extra("shadows[0]", mirrored.version, mirrored.predictor_model_name, mirrored.endpoints)
        shadow = Shadow(name, mirrored.mirror_percent / 100.0)
    fallback = ""
    if message.HasField("fallback"):
        spare = message.fallback
        fallback = extra("fallback", spare.version, spare.predictor_model_name, spare.endpoints)
    outputs = message.static_fallback.outputs
    static_answer = tuple(
        (name, static_value(f"{where}.static_fallback.outputs[{name}]", outputs[name])) for name in sorted(outputs)
    )
    return ModelRoute(
        message.model_name,
        tuple(versions.values()),
        message.split_seed,
        shadow=shadow,
        fallback=fallback,
        score_output=message.score_output,
        score_bounds=tuple(message.score_bucket_bounds),
        active_rollout_id=message.active_rollout_id,
        static_answer=static_answer,
    )


def _watched(table: RouteTable, models: Collection[str]) -> list[ModelRoute]:
    return [r for r in table.routes if not models or r.model in models]


def table_message(
    table: RouteTable, models: Collection[str] = (), changed_at: Mapping[str, int] | None = None
) -> pb.RouteTable:
    """A snapshot of the table, restricted to `models` (empty: all)."""
    changed_at = changed_at or {}
    message = pb.RouteTable(
        revision=table.revision,
        routes=[route_message(r, changed_at.get(r.model, table.revision)) for r in _watched(table, models)],
        metrics=metrics_message(table.metrics),
    )
    message.generated_at.FromNanoseconds(time.time_ns())
    return message


def route_table(message: pb.RouteTable) -> RouteTable:
    """A table from a snapshot; RouteError names the field that is wrong."""
    return RouteTable(message.revision, tuple(model_route(r) for r in message.routes), metrics_config(message.metrics))


def kept_table(table: RouteTable, changed_at: Mapping[str, int]) -> bytes:
    """The table as the manager keeps it in its database: a snapshot of every route with when it last changed."""
    return table_message(table, (), changed_at).SerializeToString()


def read_kept_table(data: bytes) -> tuple[RouteTable, dict[str, int]]:
    """A kept table and, for each model, the revision its route last changed at; RouteError if unreadable."""
    try:
        message = pb.RouteTable.FromString(data)
    except DecodeError as err:
        raise RouteError(f"kept route table: expected a RouteTable message, got unreadable bytes: {err}") from None
    return route_table(message), {r.model_name: r.revision for r in message.routes}


def update_message(
    old: RouteTable, new: RouteTable, models: Collection[str] = (), changed_at: Mapping[str, int] | None = None
) -> pb.RouteUpdate:
    """What turns `old` into `new` for a gateway watching `models` (empty: all)."""
    changed_at = changed_at or {}
    before = {r.model: r for r in _watched(old, models)}
    after = {r.model: r for r in _watched(new, models)}
    message = pb.RouteUpdate(
        revision=new.revision,
        base_revision=old.revision,
        upserted_routes=[
            route_message(r, changed_at.get(m, new.revision)) for m, r in after.items() if before.get(m) != r
        ],
        removed_model_names=sorted(set(before) - set(after)),
    )
    if new.metrics != old.metrics:
        message.metrics.CopyFrom(metrics_message(new.metrics))
    return message


def apply_update(table: RouteTable, update: pb.RouteUpdate) -> RouteTable:
    """`table` with the update applied; RouteError when it is not based on `table` or is invalid."""
    if update.base_revision != table.revision:
        raise RouteError(
            f"base_revision: expected {table.revision} (the revision this gateway holds), got {update.base_revision}"
        )
    if update.revision < table.revision:
        raise RouteError(f"revision: expected at least {table.revision}, got {update.revision}")
    routes = {r.model: r for r in table.routes}
    for name in update.removed_model_names:
        routes.pop(name, None)
    for message in update.upserted_routes:
        routes[message.model_name] = model_route(message)
    metrics = metrics_config(update.metrics) if update.HasField("metrics") else table.metrics
    return RouteTable(update.revision, tuple(routes.values()), metrics)
