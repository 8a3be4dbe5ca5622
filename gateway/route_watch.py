"""The gateway's side of WatchRoutes (a `StreamWatcher`): the route table kept current from the model
manager's stream, acked per revision, and kept in the state directory so a restarted gateway serves
while the manager is down."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Final

from grpc import aio

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as pb_grpc
from fresco.api.models.v1 import routing_pb2
from gateway.watch_stream import StreamWatcher, read_saved, save_atomically
from model_manager import route_codec
from model_manager.routes import RouteError, RouteTable

log = logging.getLogger(__name__)
STATE_FILE: Final = "routes.pb"


def save_table(state_dir: Path, table: RouteTable) -> None:
    """Write the table to the state directory atomically: a reader sees the old file or the new one."""
    save_atomically(state_dir, STATE_FILE, route_codec.table_message(table).SerializeToString())


def load_table(state_dir: Path) -> tuple[RouteTable, float] | None:
    """The table saved in the state directory and when it was saved (epoch seconds), if any is readable."""
    saved = read_saved(state_dir, STATE_FILE)
    if saved is None:
        return None
    data, saved_at = saved
    try:
        return route_codec.route_table(routing_pb2.RouteTable.FromString(data)), saved_at
    except Exception as err:  # noqa: BLE001 (a damaged file must not stop the gateway: the manager sends a snapshot)
        log.warning("ignoring unreadable route state %s: %s", state_dir / STATE_FILE, err)
        return None


def apply(table: RouteTable | None, response: pb.WatchRoutesResponse) -> RouteTable:
    """The table after one stream message; RouteError (or another FrescoError) says why it is refused."""
    kind = response.WhichOneof("kind")
    if kind == "snapshot":
        new = route_codec.route_table(response.snapshot)
        if table is not None and new.revision < table.revision:
            raise RouteError(
                f"snapshot.revision: expected at least the held revision {table.revision}, got {new.revision}"
            )
        return new
    if kind == "update":
        if table is None:
            raise RouteError(
                "update.base_revision: this gateway holds no table to apply it to "
                f"(got base revision {response.update.base_revision})"
            )
        return route_codec.apply_update(table, response.update)
    raise RouteError("kind: expected a snapshot or an update, got an empty message")


class RouteWatcher(StreamWatcher[RouteTable]):
    """Keeps `table` current from the model manager's route stream."""

    kind = "route"
    header = route_codec.REVISION_HEADER

    @property
    def table(self) -> RouteTable | None:
        """The route table in use; None before any."""
        return self.current

    def revision_of(self, state: RouteTable) -> int:
        return state.revision

    def apply(self, state: RouteTable | None, response: Any) -> RouteTable:
        return apply(state, response)

    def open(self, channel: aio.Channel) -> Any:
        stub: pb_grpc.ModelManagerServiceAsyncStub = pb_grpc.ModelManagerServiceStub(channel)
        return stub.WatchRoutes()

    def subscribe(self, revision: int) -> pb.WatchRoutesRequest:
        subscription = pb.RouteSubscription(gateway_id=self.gateway_id, resume_from_revision=revision)
        return pb.WatchRoutesRequest(subscribe=subscription)

    def ack(self, revision: int, accepted: bool, error: str = "") -> pb.WatchRoutesRequest:
        return pb.WatchRoutesRequest(ack=pb.RouteAck(revision=revision, accepted=accepted, error=error))

    def save(self, state_dir: Path, state: RouteTable) -> None:
        save_table(state_dir, state)

    def load(self, state_dir: Path) -> tuple[RouteTable, float] | None:
        return load_table(state_dir)
