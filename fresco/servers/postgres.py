"""A real PostgreSQL server (Debian's postgresql package) on a free loopback port, its cluster in a temp dir.

PostgreSQL refuses to run as root, so as root the cluster belongs to another user: $FRESCO_POSTGRES_USER, else
`postgres` (which Debian's package creates), else `nobody`. The temp dir is made outside pytest's own (which only
root may enter) and handed to that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from fresco.servers._process import ServerError, ServerProcess, free_port, launch_command, require_binary

_INSTALL_HINT = "apt-get install -y postgresql"
SUPERUSER = "fresco"


def find_bin_dir() -> Path:
    """$FRESCO_POSTGRES_BIN, else the newest /usr/lib/postgresql/<major>/bin, else the directory of initdb on PATH."""
    if override := os.environ.get("FRESCO_POSTGRES_BIN"):
        return Path(override)
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if found:

        def major(path: str) -> int:
            match = re.search(r"/postgresql/(\d+)/", path)
            return int(match.group(1)) if match else 0

        return Path(max(found, key=major)).parent
    return Path(require_binary("initdb", _INSTALL_HINT)).parent


def run_as_user() -> tuple[int, int] | None:
    """(uid, gid) of the user the cluster runs as when this process is root; None otherwise."""
    if os.geteuid() != 0:
        return None
    for name in filter(None, (os.environ.get("FRESCO_POSTGRES_USER"), "postgres", "nobody")):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    raise ServerError("running as root and no user to run PostgreSQL as: set FRESCO_POSTGRES_USER")


class PostgresServer(ServerProcess):
    """A throwaway PostgreSQL cluster as a child process: trust authentication, superuser `fresco`, no fsync."""

    name = "postgres"
    start_timeout_s = 60.0
    stop_timeout_s = 15.0

    def __init__(self, port: int | None = None) -> None:
        self.base_dir = Path(tempfile.mkdtemp(prefix="fresco-postgres-"))
        self.data_dir = self.base_dir / "data"
        self.port = free_port() if port is None else port
        self._bin = Path()
        super().__init__(self.base_dir / "postgres.log")

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of a database on this server (psycopg 3 driver)."""
        return f"postgresql+psycopg://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def _user(self) -> tuple[int, int] | None:
        return run_as_user()

    def _prepare(self) -> None:
        self._bin = find_bin_dir()
        if not (self._bin / "postgres").exists():
            raise ServerError(f"no postgres binary in {self._bin}; install it with: {_INSTALL_HINT}")
        user = self._user()
        if user is not None:
            os.chown(self.base_dir, *user)
        if (self.data_dir / "PG_VERSION").exists():
            return
        initdb = [str(self._bin / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust", "--no-sync"]
        result = subprocess.run(
            launch_command([*initdb, "--encoding=UTF8"], user),  # as the user, without forking gRPC's threads
            cwd=self.base_dir,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise ServerError(f"initdb failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")

    def _command(self) -> list[str]:
        # A throwaway cluster: durability settings off for speed; the socket lives in the cluster's own dir.
        return [
            str(self._bin / "postgres"),
            "-D", str(self.data_dir),
            "-p", str(self.port),
            "-k", str(self.base_dir),
            "-c", f"listen_addresses={self.host}",
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
            "-c", "max_connections=200",
        ]  # fmt: skip

    def _wait_ready(self, deadline: float) -> None:
        ready = [str(self._bin / "pg_isready"), "-h", self.host, "-p", str(self.port), "-U", SUPERUSER, "-t", "1"]
        while time.monotonic() < deadline:
            if self.exited():
                raise self._failure(f"exited with code {self.returncode}")
            if subprocess.run(ready, capture_output=True, check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise self._failure(f"did not accept connections on port {self.port} in time")

    def create_database(self, name: str) -> str:
        """Create an empty database and return its URL."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"database name {name!r}: expected lower-case letters, digits and '_'")
        psql = [str(self._bin / "psql"), "-h", self.host, "-p", str(self.port), "-U", SUPERUSER, "-d", "postgres"]
        create = [*psql, "-v", "ON_ERROR_STOP=1", "-c", f"CREATE DATABASE {name}"]
        result = subprocess.run(create, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ServerError(f"CREATE DATABASE {name} failed: {result.stderr.strip()}")
        return self.url(name)

    def stop(self, timeout: float | None = None) -> None:
        """Fast shutdown (SIGINT: open sessions are ended, unlike SIGTERM's wait for them), SIGKILL past the timeout."""
        if not self.running or self._process is None:
            return
        self._process.send_signal(signal.SIGINT)
        try:
            self._process.wait(self.stop_timeout_s if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def close(self) -> None:
        """Stop the server and remove its cluster."""
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)
