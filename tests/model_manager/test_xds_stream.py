"""The ADS stream's state-of-the-world protocol, driven request by request with no network."""

from __future__ import annotations

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2

from model_manager.envoy_resources import CLUSTER, CLUSTER_LOAD_ASSIGNMENT, LISTENER, ROUTE_CONFIGURATION, snapshot
from model_manager.routes import Endpoint, ModelRoute, RouteTable, VersionRoute
from model_manager.xds_stream import AdsStream, Nack

A = Endpoint.parse("10.0.0.1:8001")
B = Endpoint.parse("10.0.0.2:8001")
C = Endpoint.parse("10.0.0.3:8001")
V1, V2, V3 = "fresco/fraud/v1", "fresco/fraud/v2", "fresco/fraud/v3"
ROUTES = "fresco/fraud"


def fraud(revision: int, *versions: VersionRoute, extra: tuple[ModelRoute, ...] = ()) -> RouteTable:
    return RouteTable(revision, (ModelRoute("fraud", versions, "seed"), *extra))


TABLE_1 = fraud(1, VersionRoute("v1", 90, (A,)), VersionRoute("v2", 10, (B,)))


def request(type_url: str, names: list[str], answering: discovery_pb2.DiscoveryResponse | None = None, **fields):
    """A subscription; given a response, also its ACK (or NACK, with error=...)."""
    made = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names)
    if answering is not None:
        made.response_nonce = answering.nonce
        made.version_info = fields.pop("version", answering.version_info)
    if "error" in fields:
        made.error_detail.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
        made.error_detail.message = fields.pop("error")
    if "node" in fields:
        made.node.id = fields.pop("node")
    assert not fields
    return made


def kinds(responses: list[discovery_pb2.DiscoveryResponse]) -> list[tuple[str, str, list[str]]]:
    """(type, version, resource names) of each response, for comparing."""
    out = []
    for response in responses:
        names = []
        for packed in response.resources:
            message = {
                CLUSTER: cluster_pb2.Cluster,
                CLUSTER_LOAD_ASSIGNMENT: endpoint_pb2.ClusterLoadAssignment,
                ROUTE_CONFIGURATION: route_pb2.RouteConfiguration,
            }.get(response.type_url)
            if message is None:
                names.append("listener")
                continue
            decoded = message()
            packed.Unpack(decoded)
            names.append(decoded.cluster_name if message is endpoint_pb2.ClusterLoadAssignment else decoded.name)
        short = {LISTENER: "LDS", ROUTE_CONFIGURATION: "RDS", CLUSTER: "CDS", CLUSTER_LOAD_ASSIGNMENT: "EDS"}
        out.append((short[response.type_url], response.version_info, names))
    return out


def grpc_like(stream: AdsStream) -> dict[str, discovery_pb2.DiscoveryResponse]:
    """Subscribe as gRPC does (names learnt from the previous type) and ACK everything; the last responses."""
    [lds] = stream.on_request(request(LISTENER, ["fraud"], node="client-1"))
    assert stream.on_request(request(ROUTE_CONFIGURATION, [ROUTES])) == []  # held until the listener is ACKed
    [rds] = stream.on_request(request(LISTENER, ["fraud"], lds))
    assert stream.on_request(request(ROUTE_CONFIGURATION, [ROUTES], rds)) == []
    [cds] = stream.on_request(request(CLUSTER, [V1, V2]))
    assert stream.on_request(request(CLUSTER, [V1, V2], cds)) == []
    [eds] = stream.on_request(request(CLUSTER_LOAD_ASSIGNMENT, [V1, V2]))
    assert stream.on_request(request(CLUSTER_LOAD_ASSIGNMENT, [V1, V2], eds)) == []
    return {"LDS": lds, "RDS": rds, "CDS": cds, "EDS": eds}


def test_a_subscription_is_answered_and_a_bare_ack_is_not() -> None:
    stream = AdsStream(snapshot(TABLE_1))
    sent = grpc_like(stream)
    assert kinds(list(sent.values())) == [
        ("LDS", "1", ["listener"]),
        ("RDS", "1", [ROUTES]),
        ("CDS", "1", [V1, V2]),
        ("EDS", "1", [V1, V2]),
    ]
    assert len({r.nonce for r in sent.values()}) == 4
    status = stream.status()
    assert status.node_id == "client-1"
    assert status.route_revision == 1
    assert status.synced_revision == 1
    assert status.acked == {LISTENER: "1", ROUTE_CONFIGURATION: "1", CLUSTER: "1", CLUSTER_LOAD_ASSIGNMENT: "1"}


def test_endpoints_go_out_before_the_route_change_that_needs_them() -> None:
    stream = AdsStream(snapshot(TABLE_1))
    grpc_like(stream)
    # v2 moves to a new replica and takes half the traffic.
    [eds] = stream.on_snapshot(snapshot(fraud(2, VersionRoute("v1", 50, (A,)), VersionRoute("v2", 50, (C,)))))
    assert kinds([eds]) == [("EDS", "2", [V1, V2])]
    [rds] = stream.on_request(request(CLUSTER_LOAD_ASSIGNMENT, [V1, V2], eds))
    assert kinds([rds]) == [("RDS", "2", [ROUTES])]
    assert stream.status().synced_revision == 1  # revision 2 is applied once its routes are accepted
    assert stream.on_request(request(ROUTE_CONFIGURATION, [ROUTES], rds)) == []
    assert stream.status().route_revision == 2
    assert stream.status().synced_revision == 2


def test_a_request_with_an_old_nonce_is_ignored() -> None:
    stream = AdsStream(snapshot(TABLE_1))
    sent = grpc_like(stream)
    [eds] = stream.on_snapshot(snapshot(fraud(2, VersionRoute("v1", 50, (A,)), VersionRoute("v2", 50, (C,)))))
    # An answer to the revision-1 response arriving late changes nothing, and sends nothing.
    assert stream.on_request(request(CLUSTER_LOAD_ASSIGNMENT, [V1, V2], sent["EDS"])) == []
    assert stream.status().acked[CLUSTER_LOAD_ASSIGNMENT] == "1"
    assert kinds(stream.on_request(request(CLUSTER_LOAD_ASSIGNMENT, [V1, V2], eds))) == [("RDS", "2", [ROUTES])]


def test_a_nack_is_recorded_not_resent_and_holds_the_routes() -> None:
    nacks: list[Nack] = []
    stream = AdsStream(snapshot(TABLE_1), on_nack=nacks.append)
    grpc_like(stream)
    [eds] = stream.on_snapshot(snapshot(fraud(2, VersionRoute("v1", 50, (A,)), VersionRoute("v2", 50, (C,)))))
    nack = request(CLUSTER_LOAD_ASSIGNMENT, [V1, V2], eds, version="1", error="endpoint rejected")
    assert stream.on_request(nack) == []  # no RDS for revision 2, and the rejected endpoints not again
    [recorded] = nacks
    assert (recorded.node_id, recorded.kind, recorded.rejected_version, recorded.kept_version, recorded.message) == (
        "client-1",
        "EDS",
        "2",
        "1",
        "endpoint rejected",
    )
    assert recorded.describe() == "xDS client client-1 rejected EDS version 2 and kept version 1: endpoint rejected"
    status = stream.status()
    assert status.rejected == {CLUSTER_LOAD_ASSIGNMENT: recorded}
    assert status.route_revision == 1  # the client keeps its last good routes
    assert status.synced_revision == 1
    # The next revision goes out in order again: endpoints first, routes once they are accepted.
    [eds3] = stream.on_snapshot(snapshot(fraud(3, VersionRoute("v1", 50, (A,)), VersionRoute("v2", 50, (B,)))))
    assert kinds([eds3]) == [("EDS", "3", [V1, V2])]
    assert kinds(stream.on_request(request(CLUSTER_LOAD_ASSIGNMENT, [V1, V2], eds3))) == [("RDS", "3", [ROUTES])]
    assert stream.status().rejected == {}


def test_cluster_responses_list_every_subscribed_cluster_and_leave_out_deleted_ones() -> None:
    churn = ModelRoute("churn", (VersionRoute("v7", 1, (C,)),), "s")
    stream = AdsStream(snapshot(fraud(1, VersionRoute("v1", 1, (A,)), VersionRoute("v2", 1, (B,)), extra=(churn,))))
    [cds] = stream.on_request(request(CLUSTER, [V1, V2, "fresco/churn/v7"]))
    assert kinds([cds]) == [("CDS", "1", ["fresco/churn/v7", V1, V2])]
    stream.on_request(request(CLUSTER, [V1, V2, "fresco/churn/v7"], cds))
    # churn's route is deleted: the response lists the clusters still there, which tells the client.
    [cds2] = stream.on_snapshot(snapshot(fraud(2, VersionRoute("v1", 1, (A,)), VersionRoute("v2", 1, (B,)))))
    assert kinds([cds2]) == [("CDS", "2", [V1, V2])]


def test_an_unknown_listener_is_answered_empty_so_the_client_learns_it_does_not_exist() -> None:
    stream = AdsStream(snapshot(TABLE_1))
    [lds] = stream.on_request(request(LISTENER, ["churn"]))
    assert kinds([lds]) == [("LDS", "1", [])]


def test_subscriptions_before_the_first_table_are_answered_when_it_comes() -> None:
    stream = AdsStream(None)
    assert stream.on_request(request(LISTENER, ["fraud"])) == []
    assert kinds(stream.on_snapshot(snapshot(TABLE_1))) == [("LDS", "1", ["listener"])]


def test_types_not_published_are_ignored() -> None:
    stream = AdsStream(snapshot(TABLE_1))
    secret = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    assert stream.on_request(request(secret, ["cert"])) == []


def envoy_like(stream: AdsStream) -> dict[str, discovery_pb2.DiscoveryResponse]:
    """Subscribe as Envoy does: clusters and listeners by wildcard, endpoints and routes by name."""
    [cds] = stream.on_request(request(CLUSTER, [], node="envoy-1"))
    stream.on_request(request(CLUSTER, [], cds))
    [eds] = stream.on_request(request(CLUSTER_LOAD_ASSIGNMENT, [V1, V2]))
    stream.on_request(request(CLUSTER_LOAD_ASSIGNMENT, [V1, V2], eds))
    [lds] = stream.on_request(request(LISTENER, []))
    stream.on_request(request(LISTENER, [], lds))
    [rds] = stream.on_request(request(ROUTE_CONFIGURATION, [ROUTES]))
    stream.on_request(request(ROUTE_CONFIGURATION, [ROUTES], rds))
    return {"CDS": cds, "EDS": eds, "LDS": lds, "RDS": rds}


def test_a_wildcard_client_gets_a_new_cluster_and_its_endpoints_before_the_routes_using_it() -> None:
    stream = AdsStream(snapshot(TABLE_1))
    sent = envoy_like(stream)
    assert kinds([sent["CDS"]]) == [("CDS", "1", [V1, V2])]
    table_2 = fraud(2, VersionRoute("v1", 80, (A,)), VersionRoute("v2", 10, (B,)), VersionRoute("v3", 10, (C,)))
    [cds] = stream.on_snapshot(snapshot(table_2))
    assert kinds([cds]) == [("CDS", "2", [V1, V2, V3])]
    # Clusters accepted, but the client has not asked for v3's endpoints yet: routes wait.
    assert stream.on_request(request(CLUSTER, [], cds)) == []
    [eds] = stream.on_request(request(CLUSTER_LOAD_ASSIGNMENT, [V1, V2, V3], sent["EDS"]))
    assert kinds([eds]) == [("EDS", "2", [V1, V2, V3])]
    [rds] = stream.on_request(request(CLUSTER_LOAD_ASSIGNMENT, [V1, V2, V3], eds))
    assert kinds([rds]) == [("RDS", "2", [ROUTES])]
    stream.on_request(request(ROUTE_CONFIGURATION, [ROUTES], rds))

    # v1 goes away: the routes stop using it first, and only then its cluster and endpoints go.
    [rds3] = stream.on_snapshot(snapshot(fraud(3, VersionRoute("v2", 50, (B,)), VersionRoute("v3", 50, (C,)))))
    assert kinds([rds3]) == [("RDS", "3", [ROUTES])]
    cds3, eds3 = stream.on_request(request(ROUTE_CONFIGURATION, [ROUTES], rds3))
    assert kinds([cds3, eds3]) == [("CDS", "3", [V2, V3]), ("EDS", "3", [V2, V3])]
    assert stream.status().synced_revision == 2
    stream.on_request(request(CLUSTER, [], cds3))
    assert stream.on_request(request(CLUSTER_LOAD_ASSIGNMENT, [V2, V3], eds3)) == []
    assert stream.status().synced_revision == 3


def test_dropping_names_gets_no_answer_and_asking_again_does() -> None:
    stream = AdsStream(snapshot(TABLE_1))
    sent = grpc_like(stream)
    assert stream.on_request(request(CLUSTER_LOAD_ASSIGNMENT, [V1], sent["EDS"])) == []
    [again] = stream.on_request(request(CLUSTER_LOAD_ASSIGNMENT, [V1, V2]))
    assert kinds([again]) == [("EDS", "1", [V1, V2])]
