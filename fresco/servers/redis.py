"""A real Redis server (Debian's redis-server) on a free loopback port, its data in a temp dir."""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from pathlib import Path

from fresco.servers._process import ServerProcess, free_port, require_binary

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

    def __init__(self, data_dir: Path | None = None, port: int | None = None, appendonly: bool = False) -> None:
        self._owns_dir = data_dir is None
        self.data_dir = Path(tempfile.mkdtemp(prefix="fresco-redis-")) if data_dir is None else data_dir
        self.port = free_port() if port is None else port
        self.appendonly = appendonly
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
