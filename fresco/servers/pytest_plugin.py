"""Session-scoped `redis_server`, `redis_cluster`, `cassandra_server` and `postgres_server` fixtures, started once
and stopped at the end.

Enable with `-p fresco.servers.pytest_plugin`, `pytest_plugins` in the rootdir's conftest, or by importing the
fixtures into a conftest. A server that cannot run fails its tests (CI installs them); FRESCO_SKIP_CASSANDRA=1
skips the Cassandra ones on purpose.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from fresco.servers import CassandraNode, PostgresServer, RedisClusterServers, RedisServer, ServerError


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session, appendonly off; tests that kill a server start their own."""
    server = RedisServer(data_dir=tmp_path_factory.mktemp("redis"))
    try:
        server.start()
    except ServerError as exc:
        pytest.fail(f"cannot start Redis for the tests: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """One Redis Cluster of 3 primaries for the whole session; tests that take a node down start their own."""
    cluster = RedisClusterServers(data_dir=tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
    except ServerError as exc:
        pytest.fail(f"cannot start a Redis Cluster for the tests: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def cassandra_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CassandraNode]:
    """One Cassandra node for the whole session (about 10 s to start); its logs stay in pytest's tmp dir."""
    if os.environ.get("FRESCO_SKIP_CASSANDRA") == "1":
        pytest.skip("FRESCO_SKIP_CASSANDRA=1: Cassandra tests skipped on request")
    node = CassandraNode(base_dir=tmp_path_factory.mktemp("cassandra"))
    try:
        node.start()
    except ServerError as exc:
        pytest.fail(f"cannot start Cassandra for the tests: {exc}", pytrace=False)
    try:
        yield node
    finally:
        # Its data is thrown away: SIGKILL spares the ~5 s a drain takes.
        node.kill()
        node.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the whole session (under a second to start); tests create their own databases."""
    server = PostgresServer()
    try:
        server.start()
    except ServerError as exc:
        server.close()
        pytest.fail(f"cannot start PostgreSQL for the tests: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.close()
