"""The gateway's side of a revisioned watch stream (WatchRoutes, WatchExperiments): subscribe with the
revision held, turn each snapshot or update into a new immutable state and swap one reference (a
request reads it once), ack or reject every revision (a bad one leaves the last good state in use),
keep the last good state in the state directory so a restarted gateway works while the source is
down, and reconnect with backoff. A subclass names the stream's messages and how state is applied."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from grpc import aio
from prometheus_client import CollectorRegistry, Counter, Gauge

from chassis.errors import FrescoError, InvalidArgument

log = logging.getLogger(__name__)
S = TypeVar("S")  # the immutable state a stream keeps current (a route table, an assignment evaluator)


def save_atomically(state_dir: Path, name: str, data: bytes) -> None:
    """Write `data` to `state_dir/name` atomically: a reader sees the old file or the new one."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=f".{name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, state_dir / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_saved(state_dir: Path, name: str) -> tuple[bytes, float] | None:
    """The bytes saved as `state_dir/name` and when (epoch seconds), None when there is no such file."""
    path = state_dir / name
    try:
        return path.read_bytes(), path.stat().st_mtime
    except FileNotFoundError:
        return None


class Resync(InvalidArgument):
    """A message refused because it was based on another revision than the one held: after the
    rejection the stream is left and subscribed again from the revision held."""


class StreamWatcher(ABC, Generic[S]):
    """Keeps `current` up to date from one watch stream. `kind` names it in metrics and logs
    (`fresco_gateway_{kind}_...`); `header` is the initial-metadata key the source sends once it
    took the subscription (any answer counts as connected when it is "")."""

    kind: str
    header: str = ""

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
        self.current: S | None = None
        self.connected = False
        self.last_contact = time.time()
        self.accepted: list[int] = []  # revisions accepted, newest last (bounded)
        self.rejected: list[tuple[int, str]] = []
        self._on_connect: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        if state_dir is not None and (loaded := self._load_state(state_dir)) is not None:
            self.current, self.last_contact = loaded
            log.info(
                "using %s revision %d from %s until %s answers",
                self.kind,
                self.revision_of(self.current),
                state_dir,
                address,
            )
        kind = self.kind
        Gauge(
            f"fresco_gateway_{kind}_staleness_seconds",
            f"Seconds since the {kind} state was last known current (0 while its stream is up).",
            registry=registry,
        ).set_function(self.staleness)
        Gauge(
            f"fresco_gateway_{kind}_revision", f"The {kind} revision in use (0 for none).", registry=registry
        ).set_function(lambda: self.revision_of(self.current) if self.current is not None else 0)
        # A snapshot after a reconnect means the source could not resume from the revision held: worth seeing.
        self.applied = Counter(
            f"fresco_gateway_{kind}_messages_applied",
            f"{kind.capitalize()} stream messages applied, by kind (snapshot or update).",
            ["kind"],
            registry=registry,
        )
        for message_kind in ("snapshot", "update"):
            self.applied.labels(message_kind)  # both exported from the start, at 0

    # What a subclass says about its stream.

    @abstractmethod
    def revision_of(self, state: S) -> int:
        """The revision a state is at."""

    @abstractmethod
    def apply(self, state: S | None, response: Any) -> S:
        """The state after one stream message; a FrescoError says why it is refused."""

    @abstractmethod
    def open(self, channel: aio.Channel) -> Any:
        """The bidirectional call on `channel`, its requests written as they come."""

    @abstractmethod
    def subscribe(self, revision: int) -> Any:
        """The opening request, resuming from `revision` (0 for none)."""

    @abstractmethod
    def ack(self, revision: int, accepted: bool, error: str = "") -> Any:
        """The request acknowledging (or rejecting) one revision."""

    @abstractmethod
    def save(self, state_dir: Path, state: S) -> None:
        """Keep the state in the state directory."""

    @abstractmethod
    def load(self, state_dir: Path) -> tuple[S, float] | None:
        """The state kept in the state directory and when it was saved, if any is readable."""

    # The stream.

    def _load_state(self, state_dir: Path) -> tuple[S, float] | None:
        try:
            return self.load(state_dir)
        except Exception as err:  # noqa: BLE001 (a damaged file must not stop the gateway: the source sends a snapshot)
            log.warning("ignoring unreadable %s state in %s: %s", self.kind, state_dir, err)
            return None

    def on_connect(self, callback: Callable[[], None]) -> None:
        """Call `callback` each time the stream (re)connects."""
        self._on_connect.append(callback)

    def staleness(self) -> float:
        """Seconds since the state was last known current: 0 while connected."""
        return 0.0 if self.connected else max(0.0, time.time() - self.last_contact)

    def start(self) -> None:
        """Watch in the background until `close`."""
        self._task = asyncio.create_task(self._run(), name=f"{self.kind}-watch")

    async def close(self) -> None:
        """Stop watching."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        delay = self._backoff_s[0]
        while True:
            channel = self._channel_factory(self._address)
            resync = False
            try:
                resync = await self._watch(channel)
            except aio.AioRpcError as err:
                code = err.code().name
                log.info("%s stream to %s ended (%s): retrying in %.1fs", self.kind, self._address, code, delay)
            except Exception:  # the watcher outlives any one stream: the state keeps serving meanwhile
                log.exception("%s stream to %s failed: retrying in %.1fs", self.kind, self._address, delay)
            finally:
                if self.connected:
                    self.connected = False
                    self.last_contact = time.time()
                    delay = self._backoff_s[0]  # it was up: start the backoff over
                await channel.close()
            if resync:
                delay = self._backoff_s[0]
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._backoff_s[1])

    def _connected(self) -> None:
        if not self.connected:
            self.connected = True
            for callback in self._on_connect:
                callback()

    async def _watch(self, channel: aio.Channel) -> bool:
        """Follow one stream until it ends; True when it was left to resubscribe at once."""
        call = self.open(channel)
        await call.write(self.subscribe(self.revision_of(self.current) if self.current is not None else 0))
        headers = await call.initial_metadata()  # empty when the call failed before the source answered
        # The source took the subscription: from here the state is current.
        if headers and (not self.header or any(key == self.header for key, _ in headers)):
            self._connected()
        async for response in call:
            self._connected()
            ack, resync = await self._receive(response)
            await call.write(ack)
            if resync:  # the source and this gateway disagree on the revision held: start over from it
                call.cancel()
                return True
        return False

    async def _receive(self, response: Any) -> tuple[Any, bool]:
        kind = response.WhichOneof("kind") or ""
        revision = getattr(response, kind).revision if kind else 0
        try:
            state = self.apply(self.current, response)
        except FrescoError as err:
            held = f"revision {self.revision_of(self.current)}" if self.current is not None else f"no {self.kind}"
            log.warning("rejected %s revision %d, keeping %s: %s", self.kind, revision, held, err)
            self.rejected = [*self.rejected[-99:], (revision, str(err))]
            return self.ack(revision, False, str(err)), isinstance(err, Resync)
        self.current = state  # one reference swapped: a request holds the state it started with
        new_revision = self.revision_of(state)
        self.applied.labels(kind).inc()
        log.info("applied %s %s to revision %d", self.kind, kind, new_revision)
        self.accepted = [*self.accepted[-99:], new_revision]
        if self._state_dir is not None:  # kept before the ack, so a restart resumes from what was acked
            try:
                await asyncio.to_thread(self.save, self._state_dir, state)
            except OSError as err:  # used all the same; only a restart without the source would miss it
                log.warning("could not keep %s revision %d in %s: %s", self.kind, new_revision, self._state_dir, err)
        return self.ack(new_revision, True), False
