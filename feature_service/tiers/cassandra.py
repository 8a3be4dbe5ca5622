"""L3: Cassandra as the durable tier of record, driven by cassandra-driver's async requests from asyncio.

One Cluster and Session per tier, prepared idempotent statements, token-aware routing, speculative
execution. Driver callbacks run on the driver's thread; a batch of requests wakes the event loop once.
Every failure to reach the cluster becomes chassis Unavailable("cassandra: ...") within the request timeout."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import zlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from cassandra import ConsistencyLevel, DriverException, RequestExecutionException, RequestValidationException
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable
from cassandra.connection import ConnectionException
from cassandra.policies import (
    ConstantReconnectionPolicy,
    ConstantSpeculativeExecutionPolicy,
    DCAwareRoundRobinPolicy,
    TokenAwarePolicy,
)
from cassandra.query import BatchStatement, BatchType, BoundStatement, tuple_factory

from chassis.errors import Unavailable
from feature_service.records import Record
from feature_service.records import latest as records_latest

# The view_keys partition of a view is split in this many buckets, so no partition grows with the whole view.
# Part of the stored format: changing it hides keys written before.
KEY_BUCKETS = 16
# Batches stay under Cassandra's default warnings: 5 KiB per batch, 10 partitions per unlogged batch.
KEYS_PER_BATCH = 50  # index rows of one partition, about 3 KiB
PARTITIONS_PER_BATCH = 10
BATCH_BYTES = 4096
MISS_LOG_TTL_S = 86_400  # a replica that polls the log less often than this would miss entries
MISS_LOG_CHUNK = 500  # keys per log row
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,47}")


class _Gather:
    """The results of many driver requests, handed to the event loop once: when all are in, or at the first error."""

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int) -> None:
        self.loop = loop
        self.future: asyncio.Future[list[Any]] = loop.create_future()
        self.results: list[Any] = [None] * count
        self._remaining = count
        self._settled = False
        self._lock = threading.Lock()
        if count == 0:
            self.future.set_result([])

    def ok(self, rows: Any, index: int) -> None:
        self.results[index] = rows
        with self._lock:
            self._remaining -= 1
            if self._remaining or self._settled:
                return
            self._settled = True
        self._settle(None)

    def failed(self, exc: BaseException, index: int) -> None:
        with self._lock:
            if self._settled:
                return
            self._settled = True
        self._settle(exc)

    def abandon(self) -> None:
        """Nobody will await the result (sending failed part way): late callbacks must not set it."""
        with self._lock:
            self._settled = True

    def _settle(self, exc: BaseException | None) -> None:
        # RuntimeError: the loop closed while requests were in flight, so nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._resolve, exc)

    def _resolve(self, exc: BaseException | None) -> None:
        if self.future.done():  # the awaiting task was cancelled
            return
        if exc is None:
            self.future.set_result(self.results)
        else:
            self.future.set_exception(exc)


_UNAVAILABLE_ERRORS = (NoHostAvailable, RequestExecutionException, ConnectionException, DriverException, OSError)


def _unavailable(exc: BaseException) -> Unavailable:
    return Unavailable(f"cassandra: {type(exc).__name__}: {exc}")


class CassandraTier:
    """records((view_name, entity)) → payload; view_keys((view_name, bucket), entity) lists a view's keys;
    statistics(view_name) → payload; redis_misses(minute, id) logs writes Redis missed. ("view" is a reserved
    word in CQL.)"""

    name = "cassandra"

    def __init__(
        self, cluster: Any, session: Any, keyspace: str, timeout_s: float, limits: tuple[int, int, int]
    ) -> None:
        """Use `await CassandraTier.open(...)`: connecting blocks, so it is done in a thread."""
        self._cluster, self._session, self.keyspace, self._timeout = cluster, session, keyspace, timeout_s
        self._max_in_flight, self._page_size, self._keys_per_request = limits
        self.requests = 0  # statements sent, for metrics and tests
        ks = keyspace
        self._select_in = self._prepare(f"SELECT entity, payload FROM {ks}.records WHERE view_name = ? AND entity IN ?")
        # The write timestamp is the event time (see feature_service.records): Cassandra keeps the latest event
        # whatever the order writes arrive in, and on equal timestamps the greater payload, i.e. the later arrival.
        self._insert = self._prepare(
            f"INSERT INTO {ks}.records (view_name, entity, payload) VALUES (?, ?, ?) USING TIMESTAMP ?"
        )
        self._log_miss = self._prepare(
            f"INSERT INTO {ks}.redis_misses (minute, id, view_name, entities, heads) VALUES (?, now(), ?, ?, ?)"
        )
        self._read_misses = self._prepare(
            f"SELECT id, view_name, entities, heads FROM {ks}.redis_misses WHERE minute = ?"
        )
        self._insert_key = self._prepare(f"INSERT INTO {ks}.view_keys (view_name, bucket, entity) VALUES (?, ?, ?)")
        self._select_keys = self._prepare(f"SELECT entity FROM {ks}.view_keys WHERE view_name = ? AND bucket = ?")
        self._save_stats = self._prepare(f"INSERT INTO {ks}.statistics (view_name, payload) VALUES (?, ?)")
        self._load_stats = self._prepare(f"SELECT payload FROM {ks}.statistics WHERE view_name = ?")

    def _prepare(self, cql: str) -> Any:
        statement = self._session.prepare(cql)
        # Every statement here can be sent twice harmlessly: that is what allows speculative execution.
        statement.is_idempotent = True
        return statement

    @classmethod
    async def open(
        cls,
        contact_points: Sequence[str],
        port: int = 9042,
        keyspace: str = "fresco_features",
        *,
        replication: Mapping[str, str | int] | None = None,
        local_dc: str | None = None,
        consistency: str = "LOCAL_QUORUM",
        request_timeout_s: float = 1.5,
        connect_timeout_s: float = 5.0,
        reconnect_delay_s: float = 0.5,
        speculative_delay_s: float = 0.05,
        max_in_flight: int = 512,
        page_size: int = 5000,
        keys_per_request: int = 100,
    ) -> CassandraTier:
        """Connect, create the keyspace and tables if missing, prepare statements; Unavailable if unreachable."""
        if not _IDENTIFIER.fullmatch(keyspace):
            raise ValueError(f"keyspace: expected a CQL identifier (letters, digits, _), got {keyspace!r}")
        level = ConsistencyLevel.name_to_value.get(consistency.upper())
        if level is None:
            raise ValueError(
                f"consistency: expected one of {sorted(ConsistencyLevel.name_to_value)}, got {consistency}"
            )
        profile = ExecutionProfile(
            load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=local_dc)),
            speculative_execution_policy=ConstantSpeculativeExecutionPolicy(speculative_delay_s, 2),
            consistency_level=level,
            request_timeout=request_timeout_s,
            row_factory=tuple_factory,
        )
        cluster = Cluster(
            list(contact_points),
            port=port,
            protocol_version=5,
            execution_profiles={EXEC_PROFILE_DEFAULT: profile},
            # Never give up on a node that went away, and notice its return within half a second.
            reconnection_policy=ConstantReconnectionPolicy(reconnect_delay_s, max_attempts=None),
            connect_timeout=connect_timeout_s,
            control_connection_timeout=connect_timeout_s,
            idle_heartbeat_interval=5,
        )
        options = replication or {"class": "SimpleStrategy", "replication_factor": 1}
        replication_cql = ", ".join(f"'{key}': '{value}'" for key, value in options.items())

        def connect() -> CassandraTier:
            try:
                session = cluster.connect()
                for cql in _schema(keyspace, replication_cql):
                    session.execute(cql, timeout=max(30.0, request_timeout_s))
                return cls(cluster, session, keyspace, request_timeout_s, (max_in_flight, page_size, keys_per_request))
            except BaseException:
                cluster.shutdown()
                raise

        try:
            return await asyncio.to_thread(connect)
        except RequestValidationException:
            raise
        except _UNAVAILABLE_ERRORS as exc:
            raise _unavailable(exc) from exc

    async def _run(self, requests: Sequence[tuple[Any, Sequence[Any] | None]]) -> list[Any]:
        """Execute (statement, values) pairs concurrently, at most max_in_flight at a time (values None: the
        statement is bound already); every result's first page, in order."""
        loop = asyncio.get_running_loop()
        self.requests += len(requests)
        results: list[Any] = []
        for start in range(0, len(requests), self._max_in_flight):
            chunk = requests[start : start + self._max_in_flight]
            gather = _Gather(loop, len(chunk))
            try:
                for index, (statement, values) in enumerate(chunk):
                    future = self._session.execute_async(statement, values, timeout=self._timeout)
                    future.add_callbacks(gather.ok, gather.failed, callback_args=(index,), errback_args=(index,))
                results.extend(await gather.future)
            except RequestValidationException:
                gather.abandon()
                raise  # a bad statement or value is a bug, not an outage
            except _UNAVAILABLE_ERRORS as exc:
                gather.abandon()
                raise _unavailable(exc) from exc
        return results

    async def read(self, keys_by_view: Mapping[str, Sequence[str]]) -> dict[str, list[Record | None]]:
        """Keys grouped by the replicas that hold them, one request per group sent to one of those replicas."""
        requests: list[tuple[Any, None]] = []
        views: list[str] = []
        for view, keys in keys_by_view.items():
            for group in self._replica_groups(view, keys):
                # Any key of the group names the same replicas, so the token-aware policy can route the IN.
                bound = BoundStatement(self._select_in, routing_key=_routing_key(view, group[0]))
                requests.append((bound.bind((view, group)), None))
                views.append(view)
        found: dict[str, dict[str, bytes]] = {view: {} for view in keys_by_view}
        for view, rows in zip(views, await self._run(requests), strict=True):
            found[view].update(rows)
        out: dict[str, list[Record | None]] = {}
        for view, keys in keys_by_view.items():
            payloads = found[view]
            out[view] = [None if (payload := payloads.get(key)) is None else Record.decode(payload) for key in keys]
        return out

    def _replica_groups(self, view: str, keys: Sequence[str], size: int = 0) -> list[list[str]]:
        """Distinct keys by replica set, at most keys_per_request each: a request per key costs the driver
        more CPU than the node's work, and token-aware groups keep each read on a node that holds the data."""
        groups: dict[Any, list[str]] = {}
        metadata = self._cluster.metadata
        for key in dict.fromkeys(keys):
            replicas = frozenset(metadata.get_replicas(self.keyspace, _routing_key(view, key)))
            groups.setdefault(replicas, []).append(key)
        size = size or self._keys_per_request
        return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]

    async def write(self, view: str, rows: Sequence[tuple[str, Record]]) -> Mapping[str, Record] | None:
        """Durable (at the configured consistency) when this returns; Unavailable if any row may have failed.
        None: which record won for each key is not known without reading it back."""
        latest = records_latest(rows)
        if not latest:
            return None
        # The key index first: a key listed without a record only costs a bloom false positive, while a record
        # whose key is not listed would be hidden by a bloom filter rebuilt from the index.
        await self._run([(batch, None) for batch in self._key_batches(view, list(latest))])
        await self._run([(batch, None) for batch in self._record_batches(view, latest)])
        return None

    def _key_batches(self, view: str, keys: Sequence[str]) -> list[BatchStatement]:
        """Index rows as unlogged batches within one partition each: one mutation per batch."""
        by_bucket: dict[int, list[str]] = {}
        for key in keys:
            by_bucket.setdefault(_bucket(key), []).append(key)
        return [
            _batch([(self._insert_key, (view, bucket, key)) for key in members[i : i + KEYS_PER_BATCH]])
            for bucket, members in by_bucket.items()
            for i in range(0, len(members), KEYS_PER_BATCH)
        ]

    def _record_batches(self, view: str, records: Mapping[str, Record]) -> list[BatchStatement]:
        """Records as small unlogged batches of keys sharing their replicas, so each batch is applied where it
        lands; kept under Cassandra's warnings (partitions per batch, batch size). A request per row costs the
        driver and the node about four times as much."""
        batches = []
        for group in self._replica_groups(view, list(records), size=len(records)):
            pending: list[tuple[Any, tuple[str, str, bytes, int]]] = []
            size = 0
            for key in group:
                record = records[key]
                payload = record.encode()
                if pending and (len(pending) == PARTITIONS_PER_BATCH or size + len(payload) > BATCH_BYTES):
                    batches.append(_batch(pending))
                    pending, size = [], 0
                pending.append((self._insert, (view, key, payload, record.event_us)))
                size += len(payload)
            batches.append(_batch(pending))
        return batches

    async def keys(self, view: str) -> AsyncIterator[str]:
        """Every key of a view: each bucket is one partition, read page by page."""
        for bucket in range(KEY_BUCKETS):
            async for page in self._pages(self._select_keys, (view, bucket), self._page_size):
                for row in page:
                    yield row[0]

    async def _pages(self, statement: Any, values: Sequence[Any], fetch_size: int) -> AsyncIterator[list[Any]]:
        loop = asyncio.get_running_loop()
        self.requests += 1
        try:
            bound = statement.bind(values)
            bound.fetch_size = fetch_size
            response = self._session.execute_async(bound, timeout=self._timeout)
            while True:
                gather = _Gather(loop, 1)
                response.clear_callbacks()
                response.add_callbacks(gather.ok, gather.failed, callback_args=(0,), errback_args=(0,))
                (page,) = await gather.future
                yield page
                if not response.has_more_pages:
                    return
                response.start_fetching_next_page()
        except RequestValidationException:
            raise
        except _UNAVAILABLE_ERRORS as exc:
            raise _unavailable(exc) from exc

    async def save_statistics(self, view: str, data: bytes) -> None:
        """Store a view's latest materialisation statistics."""
        await self._run([(self._save_stats, (view, data))])

    async def load_statistics(self, view: str) -> bytes | None:
        """A view's latest materialisation statistics, if any."""
        (rows,) = await self._run([(self._load_stats, (view,))])
        return bytes(rows[0][0]) if rows else None

    async def log_redis_misses(self, view: str, heads: Sequence[tuple[str, bytes]], now: float) -> None:
        """Record durably that Redis missed these writes ((key, head) pairs), for every replica to raise the
        floors in Redis (see feature_service.redis_misses). Kept for MISS_LOG_TTL_S."""
        minute = int(now // 60)
        requests = [
            (self._log_miss, (minute, view, [key for key, _ in chunk], [head for _, head in chunk]))
            for chunk in (heads[i : i + MISS_LOG_CHUNK] for i in range(0, len(heads), MISS_LOG_CHUNK))
        ]
        await self._run(requests)

    async def redis_misses(self, minutes: Sequence[int]) -> list[tuple[Any, str, list[tuple[str, bytes]]]]:
        """The misses logged in these minutes (by the loggers' clocks): (id, view, (key, head) pairs)."""
        out: list[tuple[Any, str, list[tuple[str, bytes]]]] = []
        for minute in minutes:
            async for page in self._pages(self._read_misses, (minute,), self._page_size):
                for ident, view, entities, heads in page:
                    out.append((ident, view, list(zip(entities or [], heads or [], strict=True))))
        return out

    async def close(self) -> None:
        """Shut the cluster connection down (it blocks, so in a thread)."""
        await asyncio.to_thread(self._cluster.shutdown)


def _batch(statements: Sequence[tuple[Any, Sequence[Any]]]) -> BatchStatement:
    batch = BatchStatement(BatchType.UNLOGGED)
    batch.is_idempotent = True  # the same values written twice are the same values
    for statement, values in statements:
        batch.add(statement, values)
    return batch


def _routing_key(view: str, key: str) -> bytes:
    """The partition key (view_name, entity) as the driver serializes a composite key to find its token."""
    parts = (view.encode(), key.encode())
    return b"".join(len(part).to_bytes(2, "big") + part + b"\x00" for part in parts)


def _bucket(key: str) -> int:
    return zlib.crc32(key.encode()) % KEY_BUCKETS


def _schema(keyspace: str, replication_cql: str) -> list[str]:
    return [
        f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {{{replication_cql}}}",
        # "records", not the "features" of earlier versions, whose write timestamps were arrival times: mixed
        # with event-time timestamps they would be ordered wrongly, so they are left behind (materialise again).
        f"CREATE TABLE IF NOT EXISTS {keyspace}.records (view_name text, entity text, payload blob, "
        "PRIMARY KEY ((view_name, entity)))",
        f"CREATE TABLE IF NOT EXISTS {keyspace}.redis_misses (minute bigint, id timeuuid, view_name text, "
        f"entities list<text>, heads list<blob>, PRIMARY KEY (minute, id)) "
        f"WITH default_time_to_live = {MISS_LOG_TTL_S}",
        f"CREATE TABLE IF NOT EXISTS {keyspace}.view_keys (view_name text, bucket int, entity text, "
        "PRIMARY KEY ((view_name, bucket), entity))",
        f"CREATE TABLE IF NOT EXISTS {keyspace}.statistics (view_name text PRIMARY KEY, payload blob)",
    ]
