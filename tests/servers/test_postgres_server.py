"""The PostgreSQL launcher against Debian's real server: SQL, its own databases, a non-root owner, clean exits."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from fresco.servers import PostgresServer, ServerError
from fresco.servers._process import port_open
from fresco.servers.pytest_plugin import postgres_server

__all__ = ["postgres_server"]
pytestmark = pytest.mark.integration


def test_databases_are_created_and_answer_sql(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database("launcher_check")
    assert url == f"postgresql+psycopg://fresco@127.0.0.1:{postgres_server.port}/launcher_check"
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t (x int PRIMARY KEY)"))
            conn.execute(sa.text("INSERT INTO t VALUES (41), (1)"))
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT sum(x) FROM t")).scalar_one() == 42
            assert conn.execute(sa.text("SELECT current_database()")).scalar_one() == "launcher_check"
    finally:
        engine.dispose()
    with pytest.raises(ServerError, match="already exists"):
        postgres_server.create_database("launcher_check")
    with pytest.raises(ValueError, match="expected lower-case letters"):
        postgres_server.create_database("Robert'); DROP TABLE students;--")


def test_the_cluster_never_runs_as_root(postgres_server: PostgresServer) -> None:
    assert postgres_server.pid is not None
    status = Path(f"/proc/{postgres_server.pid}/status").read_text()
    real_uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
    assert real_uid != 0
    assert real_uid == os.geteuid() or os.geteuid() == 0


def test_close_stops_the_server_and_removes_the_cluster() -> None:
    server = PostgresServer().start()
    base, port = server.base_dir, server.port
    assert port_open(port)
    server.close()
    assert not server.running
    assert not port_open(port)
    assert not base.exists()


def test_a_missing_installation_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRESCO_POSTGRES_BIN", str(tmp_path))
    server = PostgresServer()
    try:
        with pytest.raises(ServerError, match="apt-get install -y postgresql"):
            server.start()
    finally:
        server.close()


def test_server_dies_with_its_parent() -> None:
    """A test run killed outright must not leave a cluster running, even one run as another user."""
    code = (
        "from fresco.servers import PostgresServer; s = PostgresServer().start(); "
        "print(s.pid, s.base_dir, flush=True); input()"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as parent:
        assert parent.stdout is not None
        pid, base_dir = parent.stdout.readline().split()
        child = int(pid)
        parent.kill()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    gone = not Path(f"/proc/{child}").exists()
    shutil.rmtree(base_dir, ignore_errors=True)  # the killed parent could not remove it
    assert gone
