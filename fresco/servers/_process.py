"""What the Redis and Cassandra launchers share: free ports, and a child process to start, stop and kill."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self


class ServerError(RuntimeError):
    """A server could not be found, started or made ready; the message says what to do."""


def free_ports(count: int) -> list[int]:
    """Loopback TCP ports that were free a moment ago, all distinct: the kernel picks them while all are held."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    """One loopback TCP port that was free a moment ago."""
    return free_ports(1)[0]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on host:port right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = 50) -> str:
    """The last lines of a log file, or a note that there is none."""
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def require_binary(name: str, install_hint: str) -> str:
    """The absolute path of an executable on PATH, or a ServerError saying how to install it."""
    found = shutil.which(name)
    if found is None:
        raise ServerError(f"{name} not found on PATH; install it with: {install_hint}")
    return found


# Runs in the child instead of a preexec_fn: switches user, asks for SIGKILL when the parent dies (after the user
# switch, which would clear it), then execs the server. A preexec_fn (or user=/group=) makes subprocess fork() rather
# than vfork(); fork() runs gRPC's at-fork handlers, which restart its poller threads in the child, and those abort
# the child (SIGABRT/SIGSEGV, now and then) once close_fds closes their epoll fd before the exec: a test process with
# a live gRPC channel then saw a server "exit with code -6" at start. This launcher keeps the fork a vfork.
_LAUNCHER = """
import ctypes, os, sys
uid, gid, parent = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if uid >= 0:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
if os.getppid() != parent:
    sys.exit("parent exited before the server started")
os.execvp(sys.argv[4], sys.argv[4:])
"""


def launch_command(command: Sequence[str], user: tuple[int, int] | None = None) -> list[str]:
    """`command` behind the launcher: run as `user` (uid, gid) if given, and SIGKILLed when this process dies."""
    # PR_SET_PDEATHSIG fires when the thread that forked exits: start servers from a thread that outlives them.
    uid, gid = user if user is not None else (-1, -1)
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(uid), str(gid), str(os.getpid()), *command]


class ServerProcess:
    """A server run as a child process; subclasses say how to launch it and when it is ready."""

    name = "server"
    start_timeout_s = 30.0
    stop_timeout_s = 30.0

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Find binaries and write config files; called by every start()."""

    def _user(self) -> tuple[int, int] | None:
        """The (uid, gid) to run the server as, for servers that refuse to run as root; None keeps this user."""
        return None

    def _wait_ready(self, deadline: float) -> None:
        raise NotImplementedError

    def _failure(self, why: str) -> ServerError:
        return ServerError(f"{self.name} {why}; last lines of {self.log_path}:\n{tail(self.log_path)}")

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running and self._process else None

    def start(self, timeout: float | None = None) -> Self:
        """Launch the process and return once it serves; on failure it is killed and ServerError raised."""
        if self.running:
            raise ServerError(f"{self.name} is already running (pid {self.pid})")
        self._prepare()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        user = self._user()
        with self.log_path.open("ab") as log:
            # Its own session: a terminal's Ctrl-C reaches only the parent, which then stops it cleanly.
            self._process = subprocess.Popen(
                launch_command(self._command(), user),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready(time.monotonic() + (self.start_timeout_s if timeout is None else timeout))
        except BaseException:
            self.kill()
            raise
        return self

    def exited(self) -> bool:
        """Whether the process has ended since start()."""
        return self._process is not None and self._process.poll() is not None

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process else None

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM, wait for a clean exit, SIGKILL if it takes longer than the timeout."""
        if not self.running or self._process is None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(self.stop_timeout_s if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL and reap: the abrupt death that fault tests want."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def restart(self, timeout: float | None = None) -> Self:
        """Stop if still running, then start again with the same ports and data."""
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> Self:
        return self.start() if not self.running else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the process; subclasses also remove a temp dir they created."""
        self.stop()
