"""The Redis launcher against a real redis-server: serve, die, and come back on the same port."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from fresco.servers import RedisServer, ServerError

pytestmark = pytest.mark.integration


def test_set_and_get(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.set("greeting", "hello")
        assert client.get("greeting") == b"hello"
        assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    finally:
        client.close()


def test_killed_server_refuses_connections(tmp_path: Path) -> None:
    with RedisServer(data_dir=tmp_path) as server:
        server.kill()
        assert not server.running
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", server.port), timeout=1):
            pass
        client = redis.Redis(port=server.port, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
        with pytest.raises(redis.ConnectionError):
            client.ping()
        client.close()


def test_restart_keeps_port_and_appendonly_data(tmp_path: Path) -> None:
    with RedisServer(data_dir=tmp_path, appendonly=True) as server:
        port, first_pid = server.port, server.pid
        client = redis.Redis(port=port, socket_connect_timeout=1)
        client.set("survives", "yes")
        server.kill()
        server.restart()
        assert (server.port, server.running) == (port, True)
        assert server.pid != first_pid
        # The same client reconnects by itself to the restarted server.
        assert client.get("survives") == b"yes"
        client.close()


def test_missing_binary_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServerError, match="apt-get install -y redis-server"):
        RedisServer(data_dir=tmp_path).start()


def test_server_dies_with_its_parent(tmp_path: Path) -> None:
    """A test run killed outright must not leave servers behind."""
    code = (
        "import sys, time; from pathlib import Path; from fresco.servers import RedisServer; "
        "s = RedisServer(data_dir=Path(sys.argv[1])).start(); print(s.pid, flush=True); time.sleep(60)"
    )
    with subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True) as parent:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        parent.kill()
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists()
