"""Cross-replica invalidation over Redis pub/sub: each write is announced, and every other replica drops the
keys from its memory tier and adds them to its bloom filter.

Pub/sub delivers at most once: a replica whose subscription drops may have missed writes, so it is told
(on_lost: distrust blooms, clear memory) and, once subscribed again, told to rebuild (on_subscribed).
Announcements that cannot be sent wait in a bounded outbox; if it overflows, a "resync" goes out instead.

Against a Redis Cluster (cluster=True), a PUBLISH to any node reaches the subscribers of every node (over the
cluster bus), so a replica publishes and subscribes through one node of its choice. When that node fails, the
subscription is lost as above (on_lost), and the next attempt, publishing included, goes through the next node
of the cluster's map: invalidation carries on as long as one node is up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

DEFAULT_CHANNEL = "fresco:features:writes"


class _Lost(Exception):
    """The subscription stopped answering."""


def _noop(*args: Any) -> None:
    return None


class Invalidator:
    """Publishes this replica's writes and applies other replicas' ones through the callbacks of attach()."""

    def __init__(
        self,
        url: str,
        *,
        channel: str = DEFAULT_CHANNEL,
        origin: str | None = None,
        timeout_s: float = 0.5,
        heartbeat_s: float = 1.0,
        backoff_s: tuple[float, float] = (0.1, 2.0),
        max_pending_keys: int = 100_000,
        chunk_keys: int = 2000,
        cluster: bool = False,
    ) -> None:
        """cluster: url names one node of a Redis Cluster, from which the client discovers the others."""
        self.channel = channel
        self.origin = origin or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.heartbeat_s = heartbeat_s
        self.backoff_s = backoff_s
        self.max_pending_keys = max_pending_keys
        self.chunk_keys = chunk_keys
        # No retries: a dropped subscription must be seen as such, never silently re-made by the client.
        options: dict[str, Any] = {
            "socket_connect_timeout": timeout_s,
            "socket_timeout": timeout_s,
            "retry": Retry(NoBackoff(), 0),
        }
        self._client: Redis | RedisCluster = (
            RedisCluster.from_url(url, **options) if cluster else Redis.from_url(url, **options)
        )
        # With a cluster: which node of its map to go through, moving on at each failure; replicas start at
        # different nodes, spreading subscriptions.
        self._node_turn = zlib.crc32(self.origin.encode())
        self._on_keys: Callable[[str, list[str]], None] = _noop
        self._on_lost: Callable[[], None] = _noop
        self._on_subscribed: Callable[[], None] = _noop
        self._pending: deque[bytes] = deque()
        self._flushing = asyncio.Lock()  # one flusher at a time, or two could send one message and drop the next
        self._closing = False
        self._quiet_until = 0.0  # no publishing attempts from writes before this (monotonic): Redis just failed
        self._pending_keys = 0
        self._resync = False
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.received = 0
        self.losses = 0

    def attach(
        self,
        on_keys: Callable[[str, list[str]], None],
        on_lost: Callable[[], None],
        on_subscribed: Callable[[], None],
    ) -> None:
        """Set the callbacks; they run on the event loop and must return quickly (start tasks for long work)."""
        self._on_keys, self._on_lost, self._on_subscribed = on_keys, on_lost, on_subscribed

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    async def start(self, wait_s: float = 2.0) -> bool:
        """Start listening in the background; whether the subscription was up within wait_s."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"invalidator {self.channel}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), wait_s)
        return self.subscribed

    async def publish(self, view: str, keys: Sequence[str]) -> None:
        """Announce written keys; never raises: what cannot be sent now waits in the outbox."""
        messages = [
            msgpack.packb({"origin": self.origin, "view": view, "keys": list(keys[i : i + self.chunk_keys])})
            for i in range(0, len(keys), self.chunk_keys)
        ]
        self._queue(messages, len(keys))
        if time.monotonic() >= self._quiet_until:  # else Redis just failed: the listener flushes once it is back
            await self._flush()

    def _queue(self, messages: list[bytes], keys: int) -> None:
        if self._resync:
            return
        self._pending.extend(messages)
        self._pending_keys += keys
        if self._pending_keys > self.max_pending_keys:
            # Too much to replay: ask every replica to start over instead.
            self._pending.clear()
            self._pending_keys = 0
            self._resync = True

    async def _flush(self) -> bool:
        async with self._flushing:
            try:
                if self._resync:
                    await self._publish(msgpack.packb({"origin": self.origin, "resync": True}))
                    self._resync = False
                while self._pending:
                    await self._publish(self._pending[0])
                    self._pending.popleft()
                self._pending_keys = 0
                return True
            except (RedisError, OSError) as exc:
                self._node_turn += 1
                self._quiet_until = time.monotonic() + self.heartbeat_s
                log.warning("invalidation publish failed, %d messages wait: %s", len(self._pending), exc)
                return False

    @property
    def node_name(self) -> str | None:
        """With a cluster, the node ("host:port") publishing and subscribing go through now, once known."""
        if not isinstance(self._client, RedisCluster):
            return None
        nodes = sorted(self._client.get_nodes(), key=lambda node: node.name)
        return nodes[self._node_turn % len(nodes)].name if nodes else None

    async def _node(self) -> ClusterNode:
        """With a cluster, the node to publish and subscribe through."""
        assert isinstance(self._client, RedisCluster)
        await self._client.initialize()  # reads the cluster's map the first time only
        nodes = sorted(self._client.get_nodes(), key=lambda node: node.name)
        return nodes[self._node_turn % len(nodes)]

    async def _publish(self, data: bytes) -> None:
        if isinstance(self._client, RedisCluster):
            await self._client.publish(self.channel, data, target_nodes=await self._node())
        else:
            await self._client.publish(self.channel, data)

    async def _pubsub(self) -> PubSub:
        if isinstance(self._client, RedisCluster):
            return self._client.pubsub(node=await self._node())
        return self._client.pubsub()

    async def _run(self) -> None:
        delay = self.backoff_s[0]
        # Ends once closing, even when a cancellation is swallowed inside redis-py's connect (seen against a
        # Redis that refuses connections: the loop went on retrying and close() waited for it forever).
        while not self._closing:
            pubsub: PubSub | None = None
            try:
                pubsub = await self._pubsub()
                await pubsub.subscribe(self.channel)
                await self._confirm(pubsub)
                self._subscribed.set()
                delay = self.backoff_s[0]
                log.info("invalidation: subscribed to %s as %s", self.channel, self.origin)
                self._call(self._on_subscribed)
                await self._flush()
                await self._listen(pubsub)
            except (RedisError, OSError, _Lost) as exc:
                log.warning("invalidation: subscription to %s lost: %s", self.channel, exc)
            except Exception:  # a bug must not end invalidation for good: treated as a loss, and retried
                log.exception("invalidation: listener failed")
            finally:
                was_subscribed = self.subscribed
                self._subscribed.clear()
                self._node_turn += 1  # with a cluster, the next attempt goes through another node
                if pubsub is not None:
                    with contextlib.suppress(RedisError, OSError):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]
                if was_subscribed and not self._closing:
                    self.losses += 1
                    self._call(self._on_lost)
            if self._closing:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_s[1])

    async def _confirm(self, pubsub: PubSub) -> None:
        deadline = time.monotonic() + self.heartbeat_s * 3
        while time.monotonic() < deadline:
            message = await pubsub.get_message(timeout=self.heartbeat_s)
            if message is not None and message["type"] == "subscribe":
                return
        raise _Lost("no subscribe confirmation")

    async def _listen(self, pubsub: PubSub) -> None:
        last_heard = time.monotonic()
        while True:
            message = await pubsub.get_message(timeout=self.heartbeat_s)
            now = time.monotonic()
            if message is not None:
                last_heard = now
                if message["type"] == "message":
                    self._handle(message["data"])
                continue
            # Silence may be a dead connection (no FIN): a ping must come back, or the subscription is lost.
            if now - last_heard > self.heartbeat_s * 3:
                raise _Lost(f"no answer for {now - last_heard:.1f}s")
            await pubsub.ping()
            if self._pending or self._resync:
                await self._flush()

    def _handle(self, data: bytes) -> None:
        try:
            message = msgpack.unpackb(data, raw=False)
            origin, resync = message["origin"], bool(message.get("resync"))
            view, keys = (None, []) if resync else (str(message["view"]), [str(key) for key in message["keys"]])
        except (ValueError, KeyError, TypeError, AttributeError, msgpack.UnpackException) as exc:
            log.warning("invalidation: unreadable message ignored: %s", exc)
            return
        if origin == self.origin:
            return
        self.received += 1
        if view is None:
            self._call(self._on_lost)
            self._call(self._on_subscribed)
        else:
            self._call(self._on_keys, view, keys)

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:  # one bad callback must not stop invalidation for good
            log.exception("invalidation callback %s failed", getattr(callback, "__name__", callback))

    async def close(self, flush_timeout_s: float = 1.0) -> None:
        """Send what waits in the outbox if Redis lets us soon, stop listening, close the connections."""
        self._closing = True
        if self._pending or self._resync:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush(), flush_timeout_s)
        if self._task is not None:
            while not self._task.done():  # a cancellation redis-py swallowed is sent again; _closing ends the loop
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=0.5)
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._client.aclose()
