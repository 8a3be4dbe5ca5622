"""The xDS resources built from a route table, and xds-protos living beside the OTLP exporter."""

from __future__ import annotations

import subprocess
import sys

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2

from model_manager.envoy_resources import (
    CLUSTER,
    CLUSTER_LOAD_ASSIGNMENT,
    LISTENER,
    ROUTE_CONFIGURATION,
    ROUTER_FILTER,
    cluster,
    listener,
    load_assignment,
    route_configuration,
    snapshot,
)
from model_manager.routes import Endpoint, ModelRoute, RouteTable, Shadow, VersionRoute

A = Endpoint.parse("10.0.0.1:8001", zone="a")
A2 = Endpoint.parse("10.0.0.2:8001", zone="a")
B = Endpoint.parse("[fd00::3]:8001", zone="b")


def fraud(v1: int = 90, v2: int = 10, v3: int = 0) -> ModelRoute:
    versions = (VersionRoute("v1", v1, (A, A2)), VersionRoute("v2", v2, (B,)), VersionRoute("v3", v3, (A,)))
    return ModelRoute("fraud", versions, "seed", shadow=Shadow("v3", 0.05))


def test_listener_is_an_api_listener_with_rds_over_ads_and_the_router_last() -> None:
    built = listener("fraud")
    assert built.name == "fraud"  # what `xds:///fraud` looks up
    manager = http_connection_manager_pb2.HttpConnectionManager()
    assert built.api_listener.api_listener.Unpack(manager)
    assert manager.rds.route_config_name == "fresco/fraud"
    assert manager.rds.config_source.HasField("ads")
    assert manager.rds.config_source.resource_api_version == config_source_pb2.V3
    assert manager.http_filters[-1].name == ROUTER_FILTER
    assert manager.http_filters[-1].typed_config.Is(router_pb2.Router.DESCRIPTOR)


def test_route_configuration_splits_by_weight_and_leaves_out_weight_zero() -> None:
    built = route_configuration(fraud())
    [host] = built.virtual_hosts
    assert list(host.domains) == ["fraud"]
    [only] = host.routes
    assert only.match.WhichOneof("path_specifier") == "prefix"  # set, though empty: matches every path
    assert only.match.prefix == ""
    weighted = [(c.name, c.weight.value) for c in only.route.weighted_clusters.clusters]
    assert weighted == [("fresco/fraud/v1", 90), ("fresco/fraud/v2", 10)]
    [mirror] = only.route.request_mirror_policies
    assert mirror.cluster == "fresco/fraud/v3"
    assert mirror.runtime_fraction.default_value.numerator == 50_000


def test_cluster_takes_endpoints_by_eds_over_ads_and_speaks_http2() -> None:
    built = cluster("fraud", "v2")
    assert built.name == "fresco/fraud/v2"
    assert built.type == cluster_pb2.Cluster.EDS
    assert built.eds_cluster_config.service_name == "fresco/fraud/v2"
    assert built.eds_cluster_config.eds_config.HasField("ads")
    assert built.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    assert "envoy.extensions.upstreams.http.v3.HttpProtocolOptions" in built.typed_extension_protocol_options


def test_load_assignment_has_one_weighted_locality_per_zone_at_priority_zero() -> None:
    built = load_assignment("fraud", "v1", (A, B, A2))
    assert built.cluster_name == "fresco/fraud/v1"
    localities = [
        (
            loc.locality.zone,
            loc.load_balancing_weight.value,
            loc.priority,
            [
                (e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
                for e in loc.lb_endpoints
            ],
        )
        for loc in built.endpoints
    ]
    assert localities == [
        ("a", 2, 0, [("10.0.0.1", 8001), ("10.0.0.2", 8001)]),
        ("b", 1, 0, [("fd00::3", 8001)]),
    ]


def test_snapshot_holds_every_resource_of_the_table_by_type_and_name() -> None:
    churn = ModelRoute("churn", (VersionRoute("v7", 1, (A,)),), "s")
    built = snapshot(RouteTable(5, (fraud(), churn)))
    assert built.revision == 5
    assert sorted(built.named(LISTENER)) == ["churn", "fraud"]
    assert sorted(built.named(ROUTE_CONFIGURATION)) == ["fresco/churn", "fresco/fraud"]
    every_version = ["fresco/churn/v7", "fresco/fraud/v1", "fresco/fraud/v2", "fresco/fraud/v3"]
    assert sorted(built.named(CLUSTER)) == every_version
    assert sorted(built.named(CLUSTER_LOAD_ASSIGNMENT)) == every_version
    # The weight-0 shadow version is used by the routes too: it must reach a client before them.
    assert built.route_clusters["fresco/fraud"] == {"fresco/fraud/v1", "fresco/fraud/v2", "fresco/fraud/v3"}
    decoded = {
        LISTENER: listener_pb2.Listener,
        ROUTE_CONFIGURATION: route_pb2.RouteConfiguration,
        CLUSTER: cluster_pb2.Cluster,
        CLUSTER_LOAD_ASSIGNMENT: endpoint_pb2.ClusterLoadAssignment,
    }
    for type_url, message in decoded.items():
        for packed in built.named(type_url).values():
            assert packed.type_url == type_url
            assert packed.Unpack(message())


def test_xds_protos_and_the_otlp_exporter_import_side_by_side() -> None:
    # xds-protos ships an old copy of the OTLP protos; if it overwrote opentelemetry-proto's files,
    # the exporter fails on ScopeSpans. A fresh interpreter sees what a service process would.
    code = (
        "import envoy.service.discovery.v3.ads_pb2_grpc, fresco.api.inference.grpc_service_pb2\n"
        "import opentelemetry.exporter.otlp.proto.grpc.trace_exporter\n"
        "from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans\n"
        "from google.rpc import status_pb2\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.stdout.strip() == "ok", done.stderr
