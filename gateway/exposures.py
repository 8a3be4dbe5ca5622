"""Exposure logging: each (experiment, phase, unit, arm) is queued once per gateway (a bounded LRU of the
fields the deterministic id hashes; replicas send the same id, which the service counts once),
into a bounded queue that the request only ever offers to. A background sender sends batches with
LogExposures and keeps a batch queued until the service answered it: while the service is down
nothing is lost until the queue is full; past that, exposures are dropped and counted. What is still
queued when the gateway stops is kept in its state directory and queued again at its next start."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Final

import grpc
from google.protobuf.message import DecodeError
from grpc import aio
from prometheus_client import CollectorRegistry, Counter, Gauge

from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_service_pb2 as pb
from fresco.api.experiments.v1 import experiment_service_pb2_grpc as pb_grpc
from fresco.experiments.evaluator import Assigned
from fresco.experiments.exposure import exposure_id

log = logging.getLogger(__name__)
_SEND_TIMEOUT_S: Final = 5.0
PENDING_FILE: Final = "exposures-pending.pb"  # in the state directory: what a stop left unsent
# The service is down, overloaded or not serving exposures yet: the batch stays queued and is sent again.
RETRIED: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.CANCELLED,
    }
)


def exposure_of(assigned: Assigned, source: str, at_ns: int) -> apb.Exposure:
    """The exposure of an assigned unit whose arm answered at `at_ns` (epoch nanoseconds)."""
    exposure = apb.Exposure(
        exposure_id=exposure_id(
            assigned.experiment_key, assigned.phase, assigned.unit_type, assigned.unit_id, assigned.arm_name
        ),
        experiment_key=assigned.experiment_key,
        phase=assigned.phase,
        unit_type=assigned.unit_type,
        unit_id=assigned.unit_id,
        arm_name=assigned.arm_name,
        allocation=assigned.allocation,
        source=source,
    )
    exposure.exposed_at.FromNanoseconds(at_ns)
    return exposure


class ExposureLog:
    """The dedup LRU, the bounded queue, its counters and the sender."""

    def __init__(
        self,
        channel_factory: Callable[[str], aio.Channel],
        address: str,
        source: str,
        registry: CollectorRegistry,
        queue_size: int = 10_000,
        batch_size: int = 500,
        remembered: int = 100_000,
        backoff_s: tuple[float, float] = (0.1, 5.0),
        state_dir: Path | None = None,
    ) -> None:
        self._channel_factory = channel_factory
        self._pending_file = state_dir / PENDING_FILE if state_dir is not None else None
        self._address = address
        self.source = source
        self.queue_size = queue_size
        self._batch_size = batch_size
        self._remembered = remembered
        self._backoff_s = backoff_s
        self._queue: deque[apb.Exposure] = deque()
        # (experiment, phase, unit type, unit, arm) queued or sent, oldest first: the exposure id's fields.
        self._recent: OrderedDict[tuple[str, int, str, str, str], None] = OrderedDict()
        self._ready = asyncio.Event()  # something queued
        self._woken = asyncio.Event()  # the service is back: retry without waiting out the backoff
        self._task: asyncio.Task[None] | None = None
        self.dropped_total = 0  # exposures lost: the queue was full, or the service refused them for good
        self.sent_total = 0
        self.failed_attempts = 0  # sends that failed in a way worth retrying (the batch stayed queued)
        self.dropped = Counter(
            "fresco_gateway_exposures_dropped",
            "Exposures not delivered, by reason (queue_full, refused: an RPC error not worth retrying, "
            "rejected: a row the service refused).",
            ["reason"],
            registry=registry,
        )
        for reason in ("queue_full", "refused", "rejected"):
            self.dropped.labels(reason)
        self.sent = Counter(
            "fresco_gateway_exposures_sent", "Exposures the experiment service answered for.", registry=registry
        )
        self.duplicates = Counter(
            "fresco_gateway_exposures_duplicates",
            "Exposures the experiment service had recorded already (another replica, a retry).",
            registry=registry,
        )
        Gauge("fresco_gateway_exposures_queued", "Exposures waiting to be sent.", registry=registry).set_function(
            self.queued
        )

    def queued(self) -> int:
        """Exposures waiting to be sent (the batch in flight included)."""
        return len(self._queue)

    def offer(self, assigned: Assigned, at_ns: int | None = None) -> bool:
        """Queue the exposure of an arm that answered unless it was queued recently; never waits.
        False when it was a repeat or the queue was full (then counted as dropped)."""
        a = assigned
        key = (a.experiment_key, a.phase, a.unit_type, a.unit_id, a.arm_name)  # what the exposure id hashes
        if key in self._recent:
            self._recent.move_to_end(key)
            return False
        if len(self._queue) >= self.queue_size:
            # Not remembered: the unit's next answered request offers it again.
            self.dropped.labels("queue_full").inc()
            self.dropped_total += 1
            return False
        self._queue.append(exposure_of(assigned, self.source, time.time_ns() if at_ns is None else at_ns))
        self._recent[key] = None
        while len(self._recent) > self._remembered:
            self._recent.popitem(last=False)
        self._ready.set()
        return True

    def wake(self) -> None:
        """Try sending at once (the service is back), without waiting out the backoff."""
        self._woken.set()

    def start(self) -> None:
        """Queue again what an earlier run left unsent, then send in the background until `close`."""
        self._reload()
        self._task = asyncio.create_task(self._run(), name="exposures")

    def _reload(self) -> None:
        path = self._pending_file
        if path is None or not path.exists():
            return
        try:
            left = pb.LogExposuresRequest.FromString(path.read_bytes()).exposures
        except (OSError, DecodeError) as err:
            log.warning("exposures left unsent by the last run are unreadable, dropped: %s", err)
            path.unlink(missing_ok=True)
            return
        room = max(self.queue_size - len(self._queue), 0)
        self._queue.extend(left[:room])
        if len(left) > room:
            self.dropped.labels("queue_full").inc(len(left) - room)
            self.dropped_total += len(left) - room
        path.unlink()  # queued now: a graceful stop writes what is still unsent again
        log.info("%d exposures left unsent by the last run queued again", min(len(left), room))
        if self._queue:
            self._ready.set()

    def _keep(self) -> None:
        """Write what is still queued to the state directory (atomically), for the next start."""
        if self._pending_file is None:
            return
        tmp = self._pending_file.with_suffix(".tmp")
        try:
            tmp.write_bytes(pb.LogExposuresRequest(exposures=list(self._queue)).SerializeToString())
            os.replace(tmp, self._pending_file)
        except OSError as err:
            log.warning("%d exposures unsent at stop could not be kept: %s", len(self._queue), err)
            return
        log.info("%d exposures unsent at stop kept in %s", len(self._queue), self._pending_file)

    async def close(self) -> None:
        """Stop sending after a last attempt (two seconds at most); what is still queued then is kept in the state
        directory (without one, it is lost)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if not self._queue:
            return
        channel = self._channel_factory(self._address)
        try:
            deadline = time.monotonic() + 2.0
            while self._queue and time.monotonic() < deadline:
                await self.send_batch(pb_grpc.ExperimentServiceStub(channel), timeout_s=1.0)
        except aio.AioRpcError as err:
            log.info("%d exposures unsent at stop (%s)", len(self._queue), err.code().name)
        finally:
            await channel.close()
        if self._queue:
            self._keep()

    async def _run(self) -> None:
        delay = self._backoff_s[0]
        while True:
            # A fresh channel per failure: a channel that failed to connect waits out its own, longer, backoff.
            channel = self._channel_factory(self._address)
            stub: pb_grpc.ExperimentServiceAsyncStub = pb_grpc.ExperimentServiceStub(channel)
            try:
                while True:
                    if not self._queue:
                        self._ready.clear()
                        await self._ready.wait()
                        continue
                    await self.send_batch(stub)
                    delay = self._backoff_s[0]
            except aio.AioRpcError as err:
                self.failed_attempts += 1
                log.info(
                    "exposures to %s not sent (%s): %d queued, retrying in %.1fs",
                    self._address,
                    err.code().name,
                    len(self._queue),
                    delay,
                )
            finally:
                await channel.close()
            # New exposures do not cut the wait short (a down service would be retried per request); a reconnect does.
            self._woken.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), delay)
            delay = min(delay * 2, self._backoff_s[1])

    async def send_batch(self, stub: pb_grpc.ExperimentServiceAsyncStub, timeout_s: float = _SEND_TIMEOUT_S) -> None:
        """Send the oldest queued exposures; they leave the queue once the service answered (or refused them
        for good). AioRpcError for a failure worth retrying: they stay queued."""
        batch = [self._queue[i] for i in range(min(self._batch_size, len(self._queue)))]
        try:
            response = await stub.LogExposures(pb.LogExposuresRequest(exposures=batch), timeout=timeout_s)
        except aio.AioRpcError as err:
            if err.code() in RETRIED:
                raise
            log.warning("experiment service refused %d exposures (%s): dropped", len(batch), err.code().name)
            self._forget(len(batch))
            self.dropped.labels("refused").inc(len(batch))
            self.dropped_total += len(batch)
            return
        self._forget(len(batch))
        self.sent.inc(len(batch))
        self.sent_total += len(batch)
        self.duplicates.inc(response.duplicates)
        if response.rejections:
            self.dropped.labels("rejected").inc(len(response.rejections))
            self.dropped_total += len(response.rejections)
            first = response.rejections[0]
            log.warning(
                "experiment service rejected %d exposures, e.g. %s: %s",
                len(response.rejections),
                first.id,
                first.detail,
            )

    def _forget(self, count: int) -> None:
        for _ in range(count):
            self._queue.popleft()
