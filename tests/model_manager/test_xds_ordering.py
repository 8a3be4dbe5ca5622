"""Make before break over many random rollouts: a simulated Envoy (clusters and listeners by
wildcard, endpoints and routes by name) never holds a route to a cluster, or to endpoints, it
does not have, and always ends on the latest revision."""

from __future__ import annotations

from collections import deque

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
from envoy.service.discovery.v3 import discovery_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from model_manager.envoy_resources import CLUSTER, CLUSTER_LOAD_ASSIGNMENT, LISTENER, ROUTE_CONFIGURATION, snapshot
from model_manager.routes import Endpoint, ModelRoute, RouteTable, VersionRoute
from model_manager.xds_stream import AdsStream

VERSIONS = ("v1", "v2", "v3", "v4")


class SimulatedEnvoy:
    """Applies each response in order, ACKs it, and subscribes as Envoy does; checks as it goes."""

    def __init__(self, stream: AdsStream) -> None:
        self.stream = stream
        self.inbox: deque[discovery_pb2.DiscoveryResponse] = deque()
        self.clusters: set[str] = set()
        self.endpoints: dict[str, int] = {}  # cluster → endpoint count
        self.routes: dict[str, set[str]] = {}  # route config → clusters it uses
        self.route_names: list[str] = []
        self.latest: dict[str, discovery_pb2.DiscoveryResponse] = {}  # the last response applied, by type

    def send(self, type_url: str, names: list[str], answering: discovery_pb2.DiscoveryResponse | None) -> None:
        made = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names)
        if answering is not None:
            made.response_nonce = answering.nonce
            made.version_info = answering.version_info
        self.inbox.extend(self.stream.on_request(made))

    def start(self) -> None:
        self.send(CLUSTER, [], None)
        self.send(LISTENER, [], None)

    def step(self) -> bool:
        if not self.inbox:
            return False
        response = self.inbox.popleft()
        self.latest[response.type_url] = response
        if response.type_url == CLUSTER:
            clusters = set()
            for packed in response.resources:
                c = cluster_pb2.Cluster()
                packed.Unpack(c)
                clusters.add(c.name)
            held = set().union(*self.routes.values())
            assert held <= clusters, f"clusters {held - clusters} removed while routes use them"
            self.clusters = clusters
            self.send(CLUSTER, [], response)
            self.send(CLUSTER_LOAD_ASSIGNMENT, sorted(clusters), self.latest.get(CLUSTER_LOAD_ASSIGNMENT))
        elif response.type_url == CLUSTER_LOAD_ASSIGNMENT:
            for packed in response.resources:
                cla = endpoint_pb2.ClusterLoadAssignment()
                packed.Unpack(cla)
                self.endpoints[cla.cluster_name] = sum(len(loc.lb_endpoints) for loc in cla.endpoints)
            self.send(CLUSTER_LOAD_ASSIGNMENT, sorted(self.clusters), response)
        elif response.type_url == LISTENER:
            names = []
            for packed in response.resources:
                listener = listener_pb2.Listener()
                packed.Unpack(listener)
                manager = http_connection_manager_pb2.HttpConnectionManager()
                listener.api_listener.api_listener.Unpack(manager)
                names.append(manager.rds.route_config_name)
            self.send(LISTENER, [], response)
            self.route_names = sorted(names)
            self.send(ROUTE_CONFIGURATION, self.route_names, self.latest.get(ROUTE_CONFIGURATION))
        else:
            for packed in response.resources:
                config = route_pb2.RouteConfiguration()
                packed.Unpack(config)
                action = config.virtual_hosts[0].routes[0].route
                used = {w.name for w in action.weighted_clusters.clusters}
                used |= {m.cluster for m in action.request_mirror_policies}
                assert used <= self.clusters, f"routes to unknown clusters {used - self.clusters}"
                assert all(self.endpoints.get(c, 0) > 0 for c in used), f"routes to clusters without endpoints: {used}"
                self.routes[config.name] = used
            self.send(ROUTE_CONFIGURATION, self.route_names, response)
        return True


versions_strategy = st.lists(
    st.tuples(st.sampled_from(VERSIONS), st.integers(0, 3), st.integers(1, 2), st.integers(0, 2)),
    min_size=1,
    max_size=4,
    unique_by=lambda v: v[0],
).filter(lambda vs: any(weight > 0 for _, weight, _, _ in vs))


def table(revision: int, versions: list[tuple[str, int, int, int]]) -> RouteTable:
    routes = tuple(
        VersionRoute(name, weight, tuple(Endpoint(f"10.0.{port}.{i}", 8000 + port) for i in range(replicas)))
        for name, weight, replicas, port in sorted(versions)
    )
    return RouteTable(revision, (ModelRoute("fraud", routes, "seed"),))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(versions_strategy, st.integers(0, 6)), min_size=1, max_size=6))
def test_envoy_never_routes_ahead_of_its_clusters_and_ends_on_the_latest_revision(plan) -> None:
    stream = AdsStream(snapshot(table(1, [("v1", 1, 1, 0)])))
    envoy = SimulatedEnvoy(stream)
    envoy.start()
    for revision, (versions, steps) in enumerate(plan, start=2):
        envoy.inbox.extend(stream.on_snapshot(snapshot(table(revision, versions))))
        for _ in range(steps):  # a revision may land before the client caught up with the last one
            envoy.step()
    while envoy.step():
        pass
    last = 1 + len(plan)
    assert stream.status().synced_revision == last
    expected = {f"fresco/fraud/{name}" for name, weight, _, _ in plan[-1][0] if weight > 0}
    assert envoy.routes["fresco/fraud"] == expected
    # Clusters of versions no longer in the table are gone once nothing uses them.
    assert envoy.clusters == {f"fresco/fraud/{name}" for name, _, _, _ in plan[-1][0]}
