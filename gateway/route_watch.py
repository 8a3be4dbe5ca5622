"""The gateway's side of WatchRoutes: subscribe with the revision held, turn each snapshot or update
into a new immutable table and swap one reference (a request reads it once), ack or reject every
revision (a bad one leaves the last good table serving), keep the last good table in the state
directory so a restarted gateway serves while the manager is down, and reconnect with backoff."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Final

from grpc import aio
from prometheus_client import CollectorRegistry, Counter, Gauge

from chassis.errors import FrescoError
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as pb_grpc
from fresco.api.models.v1 import routing_pb2
from model_manager import route_codec
from model_manager.routes import RouteError, RouteTable

log = logging.getLogger(__name__)
STATE_FILE: Final = "routes.pb"


def save_table(state_dir: Path, table: RouteTable) -> None:
    """Write the table to the state directory atomically: a reader sees the old file or the new one."""
    state_dir.mkdir(parents=True, exist_ok=True)
    data = route_codec.table_message(table).SerializeToString()
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".routes-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, state_dir / STATE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_table(state_dir: Path) -> tuple[RouteTable, float] | None:
    """The table saved in the state directory and when it was saved (epoch seconds), if any is readable."""
    path = state_dir / STATE_FILE
    try:
        data = path.read_bytes()
        saved_at = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        return route_codec.route_table(routing_pb2.RouteTable.FromString(data)), saved_at
    except Exception as err:  # noqa: BLE001 (a damaged file must not stop the gateway: the manager sends a snapshot)
        log.warning("ignoring unreadable route state %s: %s", path, err)
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


class RouteWatcher:
    """Keeps `table` current from the model manager's route stream."""

    def __init__(
        self,
        channel_factory: Callable[[str], aio.Channel],
        address: str,
        gateway_id: str,
        state_dir: Path | None,
        registry: CollectorRegistry,
        backoff_s: tuple[float, float] = (0.1, 5.0),
    ) -> None:
        self._channel_factory = channel_factory
        self._address = address
        self.gateway_id = gateway_id
        self._state_dir = state_dir
        self._backoff_s = backoff_s
        self.table: RouteTable | None = None
        self.connected = False
        self.last_contact = time.time()
        self.accepted: list[int] = []  # revisions accepted, newest last (bounded)
        self.rejected: list[tuple[int, str]] = []
        self._task: asyncio.Task[None] | None = None
        if state_dir is not None and (loaded := load_table(state_dir)) is not None:
            self.table, self.last_contact = loaded
            log.info("serving route revision %d from %s until the manager answers", self.table.revision, state_dir)
        Gauge(
            "fresco_gateway_route_staleness_seconds",
            "Seconds since the route table was last known current (0 while the route stream is up).",
            registry=registry,
        ).set_function(self.staleness)
        Gauge(
            "fresco_gateway_route_revision", "The route table revision served (0 for none).", registry=registry
        ).set_function(lambda: self.table.revision if self.table is not None else 0)
        # A snapshot after a reconnect means the manager could not resume from the revision held: worth seeing.
        self.applied = Counter(
            "fresco_gateway_route_messages_applied",
            "Route stream messages applied, by kind (snapshot or update).",
            ["kind"],
            registry=registry,
        )
        for kind in ("snapshot", "update"):
            self.applied.labels(kind)  # both exported from the start, at 0

    def staleness(self) -> float:
        """Seconds since the table was last known current: 0 while connected."""
        return 0.0 if self.connected else max(0.0, time.time() - self.last_contact)

    def start(self) -> None:
        """Watch in the background until `close`."""
        self._task = asyncio.create_task(self._run(), name="route-watch")

    async def close(self) -> None:
        """Stop watching."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        delay = self._backoff_s[0]
        while True:
            channel = self._channel_factory(self._address)
            try:
                await self._watch(pb_grpc.ModelManagerServiceStub(channel))
            except aio.AioRpcError as err:
                log.info("route stream to %s ended (%s): retrying in %.1fs", self._address, err.code().name, delay)
            except Exception:  # the watcher outlives any one stream: the table keeps serving meanwhile
                log.exception("route stream to %s failed: retrying in %.1fs", self._address, delay)
            finally:
                if self.connected:
                    self.connected = False
                    self.last_contact = time.time()
                    delay = self._backoff_s[0]  # it was up: start the backoff over
                await channel.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._backoff_s[1])

    async def _watch(self, stub: pb_grpc.ModelManagerServiceAsyncStub) -> None:
        acks: asyncio.Queue[pb.WatchRoutesRequest] = asyncio.Queue()
        subscription = pb.RouteSubscription(
            gateway_id=self.gateway_id, resume_from_revision=self.table.revision if self.table is not None else 0
        )
        acks.put_nowait(pb.WatchRoutesRequest(subscribe=subscription))

        async def requests() -> AsyncIterator[pb.WatchRoutesRequest]:
            while True:
                yield await acks.get()

        call = stub.WatchRoutes(requests())
        headers = await call.initial_metadata()  # empty when the call failed before the manager answered
        # The manager took the subscription: from here the table is current.
        self.connected = any(key == route_codec.REVISION_HEADER for key, _ in headers)
        async for response in call:
            acks.put_nowait(pb.WatchRoutesRequest(ack=await self._receive(response)))

    async def _receive(self, response: pb.WatchRoutesResponse) -> pb.RouteAck:
        revision = response.snapshot.revision if response.HasField("snapshot") else response.update.revision
        try:
            table = apply(self.table, response)
        except FrescoError as err:
            log.warning("rejected route revision %d, keeping %s: %s", revision, self._held(), err)
            self.rejected = [*self.rejected[-99:], (revision, str(err))]
            return pb.RouteAck(revision=revision, accepted=False, error=str(err))
        self.table = table  # one reference swapped: a request holds the table it started with
        kind = "snapshot" if response.HasField("snapshot") else "update"
        self.applied.labels(kind).inc()
        log.info("applied route %s to revision %d", kind, table.revision)
        self.accepted = [*self.accepted[-99:], table.revision]
        if self._state_dir is not None:  # kept before the ack, so a restart resumes from what was acked
            try:
                await asyncio.to_thread(save_table, self._state_dir, table)
            except OSError as err:  # served all the same; only a restart without the manager would miss it
                log.warning("could not keep route revision %d in %s: %s", table.revision, self._state_dir, err)
        return pb.RouteAck(revision=table.revision, accepted=True)

    def _held(self) -> str:
        return f"revision {self.table.revision}" if self.table is not None else "no table"
