"""Envoy's bootstraps decoded strictly into Envoy's own protos (xds-protos): an unknown or misspelled
field, or a typed_config whose type Envoy does not have, fails; then the decoded config is checked
against the Kubernetes manifests it runs beside (Service names and ports) and the model manager's xDS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.http.grpc_stats.v3 import config_pb2 as grpc_stats_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import json_format

from model_manager.envoy_resources import ROUTER_FILTER

ROOT = Path(__file__).resolve().parents[2]
ENVOY = ROOT / "deploy" / "envoy"
BASE = ROOT / "deploy" / "kubernetes" / "base"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
BOOTSTRAPS = [ENVOY / "bootstrap.yaml", ENVOY / "tls" / "bootstrap.yaml"]
# Every typed_config the bootstraps use, by type: decoding resolves each Any against these.
TYPED: dict[str, Any] = {
    m.DESCRIPTOR.full_name: m
    for m in (
        hcm_pb2.HttpConnectionManager,
        router_pb2.Router,
        grpc_stats_pb2.FilterConfig,
        http_protocol_options_pb2.HttpProtocolOptions,
        tls_pb2.DownstreamTlsContext,
        tls_pb2.UpstreamTlsContext,
    )
}


def decode(text: str) -> bootstrap_pb2.Bootstrap:
    """Strict: unknown fields and unresolvable Any types raise json_format.ParseError."""
    return json_format.ParseDict(yaml.safe_load(text), bootstrap_pb2.Bootstrap(), ignore_unknown_fields=False)


def unpack(packed: Any) -> Any:
    message = TYPED[packed.TypeName()]()
    assert packed.Unpack(message)
    return message


def services() -> dict[str, set[int]]:
    """Service name -> its ports, from the base manifests."""
    found: dict[str, set[int]] = {}
    for path in BASE.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Service":
                found[doc["metadata"]["name"]] = {p["port"] for p in doc["spec"]["ports"]}
    return found


def endpoint(cluster: cluster_pb2.Cluster) -> tuple[str, int]:
    [locality] = cluster.load_assignment.endpoints
    [lb] = locality.lb_endpoints
    address = lb.endpoint.address.socket_address
    return address.address, address.port_value


@pytest.mark.parametrize("path", BOOTSTRAPS, ids=lambda p: str(p.relative_to(ENVOY)))
def test_bootstrap_decodes_strictly_and_matches_the_manifests(path: Path) -> None:
    bootstrap = decode(path.read_text())
    clusters = {c.name: c for c in bootstrap.static_resources.clusters}
    known = services()

    # ADS to the model manager's xDS server (mounted on its gRPC port), clusters over it.
    ads = bootstrap.dynamic_resources.ads_config
    [grpc_service] = ads.grpc_services
    manager = clusters[grpc_service.envoy_grpc.cluster_name]
    host, port = endpoint(manager)
    assert host == "fresco-model-manager"
    assert port in known[host]
    assert bootstrap.dynamic_resources.cds_config.HasField("ads")

    # The edge listener: gateway calls to every gateway pod (the headless Service), router filter last.
    [listener] = bootstrap.static_resources.listeners
    [chain] = listener.filter_chains
    [network_filter] = chain.filters
    manager_config = unpack(network_filter.typed_config)
    assert isinstance(manager_config, hcm_pb2.HttpConnectionManager)
    assert manager_config.http_filters[-1].name == ROUTER_FILTER
    for http_filter in manager_config.http_filters:
        unpack(http_filter.typed_config)
    [route] = manager_config.route_config.virtual_hosts[0].routes
    gateway = clusters[route.route.cluster]
    host, port = endpoint(gateway)
    assert host == "fresco-gateway-pods"
    assert port in known[host]
    assert gateway.type == cluster_pb2.Cluster.STRICT_DNS
    assert route.match.prefix == "/fresco.gateway.v1.GatewayService/"

    # Upstreams are gRPC: HTTP/2 to both clusters.
    for cluster in (gateway, manager):
        options = unpack(cluster.typed_extension_protocol_options[HTTP_OPTIONS])
        assert options.explicit_http_config.HasField("http2_protocol_options")

    tls = path.parent.name == "tls"
    assert chain.HasField("transport_socket") is tls
    for cluster in (gateway, manager):
        assert cluster.HasField("transport_socket") is tls
        if tls:
            upstream = unpack(cluster.transport_socket.typed_config)
            assert upstream.sni == "fresco.internal"
            assert upstream.common_tls_context.validation_context.trusted_ca.filename == "/etc/fresco/tls/ca.crt"


def test_a_misspelled_field_fails() -> None:
    text = (ENVOY / "bootstrap.yaml").read_text().replace("connect_timeout:", "conect_timeout:", 1)
    with pytest.raises(json_format.ParseError, match="conect_timeout"):
        decode(text)


def test_a_typed_config_of_an_unknown_type_fails() -> None:
    text = (ENVOY / "bootstrap.yaml").read_text().replace("router.v3.Router", "router.v3.Routr", 1)
    with pytest.raises(json_format.ParseError, match=r"router\.v3\.Routr"):
        decode(text)


def test_a_misspelled_field_inside_a_typed_config_fails() -> None:
    text = (ENVOY / "bootstrap.yaml").read_text().replace("stats_for_all_methods:", "stats_for_all_method:", 1)
    with pytest.raises(json_format.ParseError, match="stats_for_all_method"):
        decode(text)
