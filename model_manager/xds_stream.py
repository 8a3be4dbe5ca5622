"""One ADS stream's state-of-the-world protocol, with no gRPC in it: requests and new snapshots in,
the responses to send out.

- A response goes out when the client asks for new names or the resources under its subscription
  changed, one at a time per type: the next waits for the client's ACK or NACK of the last. A bare
  ACK gets nothing, nor does dropping names when what is left to send is unchanged.
- A NACK is recorded with the client's error_detail; the rejected resources are not sent again,
  and the client keeps its last good configuration.
- Make before break: a route change is sent only once the client has accepted the clusters,
  endpoints and listeners of the same revision (a client fetching clusters by wildcard, as Envoy does, must also
  have asked for and accepted the endpoints of every cluster the routes use). A cluster stays
  offered while a route the client holds or is being sent still uses it.
- A request with an old nonce is ignored: the client has a newer response to answer."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from model_manager.envoy_resources import (
    CLUSTER,
    CLUSTER_LOAD_ASSIGNMENT,
    LISTENER,
    ROUTE_CONFIGURATION,
    TYPE_ORDER,
    XdsSnapshot,
)

_WILDCARD_TYPES: Final = (LISTENER, CLUSTER)
SHORT_NAMES: Final = {LISTENER: "LDS", ROUTE_CONFIGURATION: "RDS", CLUSTER: "CDS", CLUSTER_LOAD_ASSIGNMENT: "EDS"}


@dataclass(frozen=True)
class Nack:
    """A client rejected a response: which type and version, the version it kept, and why."""

    node_id: str
    type_url: str
    rejected_version: str
    kept_version: str
    message: str
    at: float  # time.time() when the NACK arrived

    @property
    def kind(self) -> str:
        """LDS, RDS, CDS or EDS."""
        return SHORT_NAMES.get(self.type_url, self.type_url)

    def describe(self) -> str:
        """One line for a rollout's status and events."""
        return (
            f"xDS client {self.node_id or '(no node id)'} rejected {self.kind} version {self.rejected_version}"
            f" and kept version {self.kept_version or '(none)'}: {self.message}"
        )


@dataclass(frozen=True)
class ClientStatus:
    """What one connected client has accepted and what it rejected last, per resource type."""

    node_id: str
    user_agent: str
    acked: Mapping[str, str]  # type URL → version the client last ACKed
    rejected: Mapping[str, Nack]  # type URL → its NACK, while the type's latest answer is a NACK
    route_revision: int | None  # the route table revision whose routes the client accepted
    # The latest revision the client holds all of, as far as it asked: nothing of it left to send
    # or to be answered. A change counts as applied on this client once this reaches its revision.
    synced_revision: int | None


@dataclass
class _TypeState:
    names: frozenset[str] | None = None  # None until the client asks for this type
    wildcard: bool = False
    nonce: str = ""
    version: str = ""
    content: dict[str, bytes] | None = None  # what the last response carried, by resource name
    answered_names: frozenset[str] | None = None  # the subscription the last response answered
    wildcard_answered: bool = False
    awaiting: bool = False  # the last response has no ACK or NACK yet
    acked_version: str = ""
    nacked: Nack | None = None
    routes_sent: XdsSnapshot | None = None  # for routes: the snapshot of the last response…
    routes_acked: XdsSnapshot | None = None  # …and of the last one the client accepted


@dataclass(eq=False)  # each stream is itself: the service keys its queues by stream
class AdsStream:
    """The server side of one ADS stream (state of the world)."""

    snapshot: XdsSnapshot | None
    on_nack: Callable[[Nack], None] = lambda nack: None
    node_id: str = ""
    user_agent: str = ""
    _types: dict[str, _TypeState] = field(default_factory=lambda: {t: _TypeState() for t in TYPE_ORDER})
    _nonces: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _synced: int | None = None

    def on_request(self, request: discovery_pb2.DiscoveryRequest) -> list[discovery_pb2.DiscoveryResponse]:
        """Take in a request (a subscription, an ACK or a NACK); the responses it calls for."""
        if request.HasField("node") and not self.node_id:
            self.node_id = request.node.id
            self.user_agent = " ".join(
                p for p in (request.node.user_agent_name, request.node.user_agent_version) if p
            ).strip()
        state = self._types.get(request.type_url)
        if state is None:
            return []  # a type this server does not publish (secrets, runtime): nothing to say
        if request.response_nonce:
            if request.response_nonce != state.nonce:
                return []
            state.awaiting = False
            if request.HasField("error_detail"):
                state.nacked = Nack(
                    self.node_id,
                    request.type_url,
                    state.version,
                    request.version_info,
                    request.error_detail.message,
                    time.time(),
                )
                self.on_nack(state.nacked)
            else:
                state.nacked = None
                state.acked_version = request.version_info
                if request.type_url == ROUTE_CONFIGURATION:
                    state.routes_acked = state.routes_sent
        names = frozenset(request.resource_names)
        state.wildcard = request.type_url in _WILDCARD_TYPES and (not names or "*" in names)
        state.names = names - {"*"}
        return self._pump()

    def on_snapshot(self, snapshot: XdsSnapshot) -> list[discovery_pb2.DiscoveryResponse]:
        """Take in a new revision; the responses that start delivering it."""
        self.snapshot = snapshot
        return self._pump()

    def status(self) -> ClientStatus:
        """What this client has accepted and rejected."""
        routes = self._types[ROUTE_CONFIGURATION].routes_acked
        return ClientStatus(
            self.node_id,
            self.user_agent,
            {t: s.acked_version for t, s in self._types.items() if s.acked_version},
            {t: s.nacked for t, s in self._types.items() if s.nacked is not None},
            routes.revision if routes is not None else None,
            self._synced,
        )

    def _pump(self) -> list[discovery_pb2.DiscoveryResponse]:
        if self.snapshot is None:
            return []
        out = []
        for type_url in TYPE_ORDER:
            state = self._types[type_url]
            if state.names is None or state.awaiting:
                continue
            if type_url == ROUTE_CONFIGURATION and not self._ready_for_routes():
                continue
            resources = self._select(state, self._available(type_url))
            content = {name: packed.SerializeToString(deterministic=True) for name, packed in resources.items()}
            if state.content is not None and state.wildcard == state.wildcard_answered:
                # What the client still asks for, as last sent: if nothing in it changed and no name
                # is new, there is nothing to say (dropping names needs no answer).
                kept = {n: b for n, b in state.content.items() if state.wildcard or n in state.names}
                if content == kept and state.names <= (state.answered_names or frozenset()):
                    state.content, state.answered_names = content, state.names
                    continue
            state.nonce = str(next(self._nonces))
            state.version = str(self.snapshot.revision)
            state.content = content
            state.answered_names = state.names
            state.wildcard_answered = state.wildcard
            state.awaiting = True
            if type_url == ROUTE_CONFIGURATION:
                state.routes_sent = self.snapshot
            out.append(
                discovery_pb2.DiscoveryResponse(
                    version_info=state.version,
                    type_url=type_url,
                    nonce=state.nonce,
                    resources=[resources[name] for name in sorted(resources)],
                )
            )
        asked = any(state.names is not None for state in self._types.values())
        if asked and all(self._accepted(t) for t in TYPE_ORDER):
            self._synced = self.snapshot.revision
        return out

    def _available(self, type_url: str) -> dict[str, any_pb2.Any]:
        """The current revision's resources of a type; for clusters and endpoints, also those of the
        routes the client holds or is being sent, so that none is removed while still in use."""
        assert self.snapshot is not None
        offered = dict(self.snapshot.named(type_url))
        if type_url not in (CLUSTER, CLUSTER_LOAD_ASSIGNMENT):
            return offered
        routes = self._types[ROUTE_CONFIGURATION]
        for held in (routes.routes_sent, routes.routes_acked):
            if held is None or held is self.snapshot:
                continue
            for name in set().union(*held.route_clusters.values()) - offered.keys():
                resource = held.named(type_url).get(name)
                if resource is not None:
                    offered[name] = resource
        return offered

    def _accepted(self, type_url: str) -> bool:
        """Whether the client holds, ACKed, what this type's next response would carry (or never
        asked for the type)."""
        state = self._types[type_url]
        if state.names is None:
            return True
        if state.awaiting or state.nacked is not None:
            return False
        desired = self._select(state, self._available(type_url))
        return (
            {n: r.SerializeToString(deterministic=True) for n, r in desired.items()} == state.content
            and state.names == state.answered_names
            and state.wildcard == state.wildcard_answered
        )

    def _ready_for_routes(self) -> bool:
        """Whether the client has accepted this revision's clusters, endpoints and listeners, as far
        as it asked for them: a revision's routes move traffic, so they go out last."""
        if not all(self._accepted(t) for t in (CLUSTER, CLUSTER_LOAD_ASSIGNMENT, LISTENER)):
            return False
        clusters = self._types[CLUSTER]
        if clusters.wildcard:
            # A wildcard client learns every cluster and then asks for their endpoints: wait for that.
            assert self.snapshot is not None
            endpoints = self._types[CLUSTER_LOAD_ASSIGNMENT]
            used = set().union(*self.snapshot.route_clusters.values())
            if used and (endpoints.answered_names is None or not used <= endpoints.answered_names):
                return False
        return True

    @staticmethod
    def _select(state: _TypeState, available: Mapping[str, any_pb2.Any]) -> dict[str, any_pb2.Any]:
        names = available.keys() if state.wildcard else (state.names or frozenset()) & available.keys()
        return {name: available[name] for name in names}
