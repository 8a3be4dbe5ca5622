"""Fixtures of the feature service tests. The servers' own fixtures are imported, since `pytest_plugins` only works
in the rootdir's conftest; the rest give each test its own key prefix and view names on the shared servers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest

from feature_service.bloom import BloomFilters
from feature_service.invalidation import Invalidator
from feature_service.store import TieredStore
from feature_service.tiers.cassandra import CassandraTier
from feature_service.tiers.memory import MemoryCache
from feature_service.tiers.redis import RedisTier
from fresco.servers import CassandraNode, RedisServer
from fresco.servers.pytest_plugin import cassandra_server, redis_cluster, redis_server
from tests.feature_service import KEYSPACE

__all__ = ["cassandra_server", "redis_cluster", "redis_server"]


@pytest.fixture
def prefix() -> str:
    """A Redis key prefix of this test's own, so tests sharing the session's Redis never see each other's keys."""
    return f"test:{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def view() -> str:
    """A feature view name of this test's own."""
    return f"view_{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
async def cassandra(cassandra_server: CassandraNode) -> AsyncIterator[CassandraTier]:
    """One Cassandra tier for the whole session, on the session's node."""
    tier = await CassandraTier.open([cassandra_server.contact_point], cassandra_server.port, KEYSPACE)
    yield tier
    await tier.close()


StoreFactory = Callable[..., Awaitable[TieredStore]]


@pytest.fixture
async def make_store(
    cassandra_server: CassandraNode, redis_server: RedisServer, prefix: str
) -> AsyncIterator[StoreFactory]:
    """Builds replicas of a tiered store: each its own memory, blooms and connections, all sharing this test's
    Redis prefix, invalidation channel and the session's keyspace. Closed at the end of the test. Bloom filters
    are not refreshed and the Redis miss log is read hourly unless asked: tests call refresh_blooms() and
    misses.poll() where they need them."""
    stores: list[TieredStore] = []

    async def make(
        views: Sequence[str] = (),
        *,
        redis_url: str | None = None,
        redis_cluster: bool = False,
        blooms: bool = True,
        invalidation: bool = True,
        memory: MemoryCache | None = None,
        durable_class: type[CassandraTier] = CassandraTier,
        bloom_refresh_s: float | None = None,
        miss_poll_s: float = 3600.0,
    ) -> TieredStore:
        url = redis_url or redis_server.url
        channel = prefix + "writes"
        durable = await durable_class.open([cassandra_server.contact_point], cassandra_server.port, KEYSPACE)
        store = TieredStore(
            memory or MemoryCache(),
            RedisTier(url, key_prefix=prefix, timeout_s=0.3, cluster=redis_cluster),
            durable,
            BloomFilters(capacity=10_000) if blooms else None,
            Invalidator(url, channel=channel, heartbeat_s=0.3, backoff_s=(0.05, 0.3), cluster=redis_cluster)
            if invalidation
            else None,
            cache_retry_s=0.1,
            bloom_refresh_s=bloom_refresh_s,
            miss_poll_s=miss_poll_s,
        )
        stores.append(store)
        await store.start(views)
        return store

    yield make
    for store in stores:
        await store.close()
