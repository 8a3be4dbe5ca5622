"""The Cassandra launcher against a real Cassandra 5.0 node: CQL, a commitlog replay after SIGKILL, two nodes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fresco.servers import CassandraNode, ServerError
from fresco.servers import cassandra as launcher
from fresco.servers._process import port_open

pytestmark = pytest.mark.integration

KEYSPACE = "fresco_test"


@contextmanager
def connect(node: CassandraNode) -> Iterator[Any]:
    """A driver session on the node, its cluster shut down afterwards."""
    cluster = node.cluster()
    try:
        yield cluster.connect()
    finally:
        cluster.shutdown()


def create_table(session: Any) -> None:
    session.execute(
        f"CREATE KEYSPACE IF NOT EXISTS {KEYSPACE} "
        "WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}"
    )
    session.execute(f"CREATE TABLE IF NOT EXISTS {KEYSPACE}.features (entity text PRIMARY KEY, score double)")


def test_prepared_insert_and_select(cassandra_server: CassandraNode) -> None:
    assert cassandra_server.release_version.startswith("5.0.")
    with connect(cassandra_server) as session:
        create_table(session)
        insert = session.prepare(f"INSERT INTO {KEYSPACE}.features (entity, score) VALUES (?, ?)")
        select = session.prepare(f"SELECT entity, score FROM {KEYSPACE}.features WHERE entity = ?")
        session.execute(insert, ("user-1", 0.5))
        assert session.execute(select, ("user-1",)).one() == ("user-1", 0.5)
        assert session.execute(select, ("nobody",)).one() is None


def test_killed_node_replays_its_commitlog(cassandra_server: CassandraNode) -> None:
    ports = (cassandra_server.port, cassandra_server.storage_port, cassandra_server.jmx_port)
    with connect(cassandra_server) as session:
        create_table(session)
        session.execute(f"INSERT INTO {KEYSPACE}.features (entity, score) VALUES ('kept', 1.25)")
    # SIGKILL: no drain and no flush, so the row exists only in the commitlog until the restart replays it.
    cassandra_server.kill()
    assert not cassandra_server.running
    assert not port_open(cassandra_server.port)
    cassandra_server.restart()
    assert (cassandra_server.port, cassandra_server.storage_port, cassandra_server.jmx_port) == ports
    with connect(cassandra_server) as session:
        row = session.execute(f"SELECT score FROM {KEYSPACE}.features WHERE entity = 'kept'").one()
    assert row == (1.25,)


def test_two_nodes_run_side_by_side(cassandra_server: CassandraNode, tmp_path: Path) -> None:
    with CassandraNode(base_dir=tmp_path) as other:
        assert {other.port, other.storage_port, other.jmx_port}.isdisjoint(
            {cassandra_server.port, cassandra_server.storage_port, cassandra_server.jmx_port}
        )
        assert other.cluster_name != cassandra_server.cluster_name
        with connect(cassandra_server) as first:
            create_table(first)
        with connect(other) as second:
            keyspaces = {row[0] for row in second.execute("SELECT keyspace_name FROM system_schema.keyspaces")}
        assert KEYSPACE not in keyspaces
    assert not other.running


def test_missing_java_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FRESCO_CASSANDRA_JAVA", raising=False)
    monkeypatch.setattr(launcher, "_JAVA_HOMES", (str(tmp_path / "no-jdk"),))
    with pytest.raises(ServerError, match="openjdk-17"):
        CassandraNode(base_dir=tmp_path).start()


def test_cached_jars_need_no_maven(cassandra_server: CassandraNode, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cassandra_server.lib_dir is not None
    monkeypatch.setenv("PATH", "")
    assert launcher.fetch_jars(cassandra_server.lib_dir) == cassandra_server.lib_dir
