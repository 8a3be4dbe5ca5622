"""A real Redis server (Debian's redis-server) on a free loopback port, its data in a temp dir; and a Redis Cluster
of such servers."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from fresco.servers._process import ServerError, ServerProcess, free_port, free_ports, require_binary

_INSTALL_HINT = "apt-get install -y redis-server"


def ping(port: int, host: str = "127.0.0.1") -> bool:
    """A raw RESP PING: true on +PONG, false if refused or still loading its append-only file."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer(ServerProcess):
    """redis-server as a child process; `restart()` keeps the port and dir, so with appendonly the data survives."""

    name = "redis-server"
    start_timeout_s = 15.0
    stop_timeout_s = 10.0

    def __init__(
        self,
        data_dir: Path | None = None,
        port: int | None = None,
        appendonly: bool = False,
        *,
        cluster_port: int | None = None,
        cluster_node_timeout_ms: int = 1000,
    ) -> None:
        """cluster_port: start as a Redis Cluster node (`--cluster-enabled yes`, nodes.conf in data_dir) talking to
        the others on this port, declared failed by them after cluster_node_timeout_ms unreachable."""
        self._owns_dir = data_dir is None
        self.data_dir = Path(tempfile.mkdtemp(prefix="fresco-redis-")) if data_dir is None else data_dir
        self.port = free_port() if port is None else port
        self.appendonly = appendonly
        self.cluster_port = cluster_port
        self.cluster_node_timeout_ms = cluster_node_timeout_ms
        self._binary = ""
        super().__init__(self.data_dir / "redis.log")

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _prepare(self) -> None:
        self._binary = require_binary("redis-server", _INSTALL_HINT)
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def _command(self) -> list[str]:
        return [
            self._binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--logfile", "",
            *(
                []
                if self.cluster_port is None
                else [
                    "--cluster-enabled", "yes",
                    "--cluster-port", str(self.cluster_port),
                    "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(self.cluster_node_timeout_ms),
                ]
            ),
        ]  # fmt: skip

    def _wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.exited():
                raise self._failure(f"exited with code {self.returncode}")
            if ping(self.port, self.host):
                return
            time.sleep(0.05)
        raise self._failure(f"did not answer PING on port {self.port} in time")

    def close(self) -> None:
        """Stop the server and remove its data dir if this object made it."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def cluster_info(port: int, host: str = "127.0.0.1") -> dict[str, str]:
    """CLUSTER INFO of one node as a dict, empty if it does not answer."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            sock.sendall(b"*2\r\n$7\r\nCLUSTER\r\n$4\r\nINFO\r\n")
            data = b""
            while not data.endswith(b"\r\n\r\n") and not data.startswith(b"-"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return {}
    lines = data.decode(errors="replace").splitlines()[1:]  # after the bulk string's length
    return dict(line.split(":", 1) for line in lines if ":" in line)


class RedisClusterServers:
    """A Redis Cluster of `size` primaries (no replicas) on free loopback ports, made with `redis-cli --cluster
    create`; ready once every node reports cluster_state:ok. `nodes[i].kill()` / `.start()` take one down and
    bring it back (its nodes.conf keeps its identity and slots)."""

    start_timeout_s = 30.0

    def __init__(
        self, size: int = 3, data_dir: Path | None = None, node_timeout_ms: int = 1000, appendonly: bool = False
    ) -> None:
        if size < 3:
            raise ValueError(f"a Redis Cluster needs at least 3 primaries, got size={size}")
        self._owns_dir = data_dir is None
        self.data_dir = Path(tempfile.mkdtemp(prefix="fresco-redis-cluster-")) if data_dir is None else data_dir
        ports = free_ports(2 * size)  # each node's own, and its cluster bus port (not the default +10000)
        self.nodes = [
            RedisServer(
                self.data_dir / f"node-{port}",
                port,
                appendonly,
                cluster_port=bus,
                cluster_node_timeout_ms=node_timeout_ms,
            )
            for port, bus in zip(ports[:size], ports[size:], strict=True)
        ]

    @property
    def url(self) -> str:
        """A startup node's URL: the client discovers the others from it."""
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> None:
        """Start every node, join them into one cluster, wait until it serves every slot."""
        cli = require_binary("redis-cli", _INSTALL_HINT)
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            create = subprocess.run(
                [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True,
                text=True,
                timeout=self.start_timeout_s,
                check=False,
            )
            if create.returncode != 0:
                raise ServerError(f"redis-cli --cluster create failed:\n{create.stdout}\n{create.stderr}")
            self.wait_ok()
        except BaseException:
            self.close()
            raise

    def wait_ok(self, timeout_s: float | None = None) -> None:
        """Wait until every running node reports cluster_state:ok (all slots served and agreed on)."""
        deadline = time.monotonic() + (self.start_timeout_s if timeout_s is None else timeout_s)
        while time.monotonic() < deadline:
            if all(cluster_info(node.port).get("cluster_state") == "ok" for node in self.nodes):
                return
            time.sleep(0.05)
        states = {node.port: cluster_info(node.port).get("cluster_state") for node in self.nodes}
        raise ServerError(f"redis cluster not ok in time: {states}")

    def close(self) -> None:
        """Stop every node and remove the data dir if this object made it."""
        for node in self.nodes:
            node.close()
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
