"""Server processes of the benchmark: started on a free loopback port, waited on until every worker
answers ready, and always stopped (SIGTERM to the process group, SIGKILL past a grace period)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.predictor.protocol import probe_ready

HOST = "127.0.0.1"


class ServerFailed(RuntimeError):
    """A server exited, or did not become ready in time."""


def free_port(host: str = HOST) -> int:
    """A port nobody listens on right now (the usual small race is acceptable on a quiet loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = 25) -> str:
    """The last lines of a log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class ServerProcess:
    """One server under test: its command, its port, its log file."""

    name: str
    command: Sequence[str]
    port: int
    log_path: Path
    cwd: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> ServerProcess:
        """Start the process in its own session (its workers with it), output to the log file."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                list(self.command),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                start_new_session=True,
            )
        return self

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            code = self.process.returncode
            raise ServerFailed(f"{self.name} exited with {code}; its log ({self.log_path}):\n{log_tail(self.log_path)}")

    def wait_for_line(self, text: str, timeout_s: float) -> None:
        """Block until the log holds `text` (e.g. a supervisor's line saying every worker listens)."""
        deadline = time.monotonic() + timeout_s
        while text not in self.log_path.read_text(errors="replace"):
            self.check_alive()
            if time.monotonic() > deadline:
                tail = log_tail(self.log_path)
                raise ServerFailed(f"{self.name} did not print {text!r} in {timeout_s:.0f}s:\n{tail}")
            time.sleep(0.1)

    def wait_ready(self, model: str, timeout_s: float, health: bool = False, probes: int = 1) -> None:
        """Block until `probes` successive probes, each on a new connection, find the model ready.

        With several worker processes behind one port, new connections land on different workers, so
        many successive successes mean every worker has loaded the model, not only the first one.
        """
        deadline = time.monotonic() + timeout_s
        successes, detail = 0, "not probed yet"
        while successes < probes:
            self.check_alive()
            if time.monotonic() > deadline:
                raise ServerFailed(
                    f"{self.name} not ready after {timeout_s:.0f}s ({detail}); log:\n{log_tail(self.log_path)}"
                )
            check = probe_ready(self.address, model, health)
            detail = check.detail
            if check.ready:
                successes += 1
            else:
                successes = 0
                time.sleep(0.1)

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM to the server's process group, SIGKILL after `grace_s`; the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.process.wait()
        # Workers the server started in its session and left behind.
        self._signal_group(signal.SIGKILL)
        return self.process.returncode

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)  # the group this process leads (start_new_session)
