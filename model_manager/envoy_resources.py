"""A route table as the xDS resources that Envoy and gRPC's proxyless client read.

For each model: a Listener named after the model (so `xds:///<model>` finds it) whose api_listener
is an HttpConnectionManager taking its routes by RDS over ADS, router filter last; a
RouteConfiguration splitting by `weighted_clusters`; one EDS Cluster per version; and a
ClusterLoadAssignment per version with its replicas as IP endpoints, one locality per zone."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from model_manager.routes import Endpoint, ModelRoute, RouteTable

LISTENER: Final = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_CONFIGURATION: Final = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER: Final = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
CLUSTER_LOAD_ASSIGNMENT: Final = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
# The order a change reaches a client in: clusters and their endpoints before the routes that use them.
TYPE_ORDER: Final = (CLUSTER, CLUSTER_LOAD_ASSIGNMENT, LISTENER, ROUTE_CONFIGURATION)

ROUTER_FILTER: Final = "envoy.filters.http.router"
_HTTP_PROTOCOL_OPTIONS: Final = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_CONNECT_TIMEOUT_S: Final = 1


def route_config_name(model: str) -> str:
    """The RouteConfiguration a model's listener asks for by RDS."""
    return f"fresco/{model}"


def cluster_name(model: str, version: str) -> str:
    """The Cluster (and ClusterLoadAssignment) of one model version."""
    return f"fresco/{model}/{version}"


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
    )


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message, deterministic=True)
    return packed


def listener(model: str) -> listener_pb2.Listener:
    """The model's Listener: an api_listener HttpConnectionManager, routes by RDS, router filter last."""
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=model,
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=route_config_name(model)),
        # gRPC rejects a listener whose last HTTP filter is not the router, and so does Envoy.
        http_filters=[hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=_pack(router_pb2.Router()))],
    )
    return listener_pb2.Listener(name=model, api_listener=api_listener_pb2.ApiListener(api_listener=_pack(manager)))


def route_configuration(route: ModelRoute) -> route_pb2.RouteConfiguration:
    """The model's routes: one virtual host whose only route splits by the versions' weights."""
    # A weight-0 cluster takes no traffic, and gRPC never resolves it: it is left out.
    clusters = [
        route_components_pb2.WeightedCluster.ClusterWeight(
            name=cluster_name(route.model, v.version), weight=wrappers_pb2.UInt32Value(value=v.weight)
        )
        for v in route.versions
        if v.weight > 0
    ]
    action = route_components_pb2.RouteAction(weighted_clusters=route_components_pb2.WeightedCluster(clusters=clusters))
    if route.shadow is not None:
        # Envoy mirrors this share of requests; gRPC's proxyless client ignores mirroring.
        per_million = max(1, round(route.shadow.share * 1_000_000))
        action.request_mirror_policies.append(
            route_components_pb2.RouteAction.RequestMirrorPolicy(
                cluster=cluster_name(route.model, route.shadow.version),
                runtime_fraction=base_pb2.RuntimeFractionalPercent(
                    default_value=percent_pb2.FractionalPercent(
                        numerator=per_million, denominator=percent_pb2.FractionalPercent.MILLION
                    )
                ),
            )
        )
    host = route_components_pb2.VirtualHost(
        name=route.model,
        domains=[route.model],
        routes=[route_components_pb2.Route(match=route_components_pb2.RouteMatch(prefix=""), route=action)],
    )
    return route_pb2.RouteConfiguration(name=route_config_name(route.model), virtual_hosts=[host])


def cluster(model: str, version: str) -> cluster_pb2.Cluster:
    """A version's Cluster: endpoints by EDS over ADS, round robin, HTTP/2 upstream (gRPC)."""
    name = cluster_name(model, version)
    http2 = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads(), service_name=name),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
        connect_timeout=duration_pb2.Duration(seconds=_CONNECT_TIMEOUT_S),
        typed_extension_protocol_options={_HTTP_PROTOCOL_OPTIONS: _pack(http2)},
    )


def load_assignment(model: str, version: str, endpoints: tuple[Endpoint, ...]) -> endpoint_pb2.ClusterLoadAssignment:
    """A version's replicas, one locality per zone weighted by its replica count, all at priority 0."""
    by_zone: dict[str, list[Endpoint]] = defaultdict(list)
    for endpoint in endpoints:
        by_zone[endpoint.zone].append(endpoint)
    localities = [
        endpoint_components_pb2.LocalityLbEndpoints(
            locality=base_pb2.Locality(zone=zone),
            # gRPC drops a locality without a weight; weighing by replicas keeps every replica's share equal.
            load_balancing_weight=wrappers_pb2.UInt32Value(value=len(members)),
            priority=0,
            lb_endpoints=[
                endpoint_components_pb2.LbEndpoint(
                    endpoint=endpoint_components_pb2.Endpoint(
                        address=address_pb2.Address(
                            socket_address=address_pb2.SocketAddress(address=e.host, port_value=e.port)
                        )
                    ),
                    health_status=health_check_pb2.HEALTHY,
                )
                for e in members
            ],
        )
        for zone, members in sorted(by_zone.items())
    ]
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster_name(model, version), endpoints=localities)


@dataclass(frozen=True)
class XdsSnapshot:
    """Every resource of one route table revision, packed, by type URL and resource name."""

    revision: int
    resources: Mapping[str, Mapping[str, any_pb2.Any]]
    # The clusters each RouteConfiguration sends traffic or mirrors to: what must reach a client first.
    route_clusters: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def named(self, type_url: str) -> Mapping[str, any_pb2.Any]:
        """This revision's resources of one type, by name."""
        return self.resources.get(type_url, {})


def snapshot(table: RouteTable) -> XdsSnapshot:
    """The table's resources: one listener and route per model, one cluster and assignment per version."""
    resources: dict[str, dict[str, any_pb2.Any]] = {t: {} for t in TYPE_ORDER}
    route_clusters: dict[str, frozenset[str]] = {}
    for route in table.routes:
        resources[LISTENER][route.model] = _pack(listener(route.model))
        config = route_configuration(route)
        resources[ROUTE_CONFIGURATION][config.name] = _pack(config)
        used = {w.name for w in config.virtual_hosts[0].routes[0].route.weighted_clusters.clusters}
        used.update(p.cluster for p in config.virtual_hosts[0].routes[0].route.request_mirror_policies)
        route_clusters[config.name] = frozenset(used)
        for version in route.versions:
            name = cluster_name(route.model, version.version)
            resources[CLUSTER][name] = _pack(cluster(route.model, version.version))
            resources[CLUSTER_LOAD_ASSIGNMENT][name] = _pack(
                load_assignment(route.model, version.version, version.endpoints)
            )
    return XdsSnapshot(
        table.revision,
        MappingProxyType({t: MappingProxyType(named) for t, named in resources.items()}),
        MappingProxyType(route_clusters),
    )
