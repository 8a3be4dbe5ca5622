"""Feast, the peer: installed once in its own virtualenv under `.cache/bench/feast-venv` (its pins clash with
Fresco's), its repository applied and materialised with its own CLI, and read in process by
`feast_runner.py`, a long-lived child speaking JSON lines, so that its cases can interleave with Fresco's."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from bench.predictor.peers import SetupError, ensure_venv
from bench.predictor.servers import log_tail

FEAST_PACKAGES = ["feast[redis]==0.67.*"]
RUNNER = Path(__file__).with_name("feast_runner.py")
MARK = "@@ "


def ensure_feast(cache: Path) -> Path:
    """Feast 0.67 with its Redis online store in `.cache/bench/feast-venv`; its python."""
    return ensure_venv(cache / "feast-venv", FEAST_PACKAGES, cache / "logs" / "setup-feast.log")


def _cli(python: Path, repo: Path, args: list[str], log: Path, timeout_s: float) -> float:
    """Run `feast -c REPO ARGS` from Feast's virtualenv; its seconds, or SetupError with the log's end."""
    command = [str(python.parent / "feast"), "-c", str(repo), *args]
    began = time.perf_counter()
    with log.open("ab") as out:
        out.write(f"$ {' '.join(command)}\n".encode())
        out.flush()
        try:
            code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise SetupError(f"`feast {args[0]}` took more than {timeout_s:.0f}s; see {log}") from None
    if code != 0:
        raise SetupError(f"`feast {args[0]}` failed (exit {code}); the end of {log}:\n{log_tail(log)}")
    return time.perf_counter() - began


def apply_and_materialize(python: Path, repo: Path, start_s: float, end_s: float, log: Path) -> tuple[float, float]:
    """`feast apply`, then `feast materialize START END` over the data's event times: seconds of each."""

    def iso(seconds: float) -> str:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")

    applied = _cli(python, repo, ["apply"], log, 300)
    materialized = _cli(python, repo, ["materialize", iso(start_s), iso(end_s)], log, 900)
    return applied, materialized


@dataclass
class FeastSession:
    """feast_runner.py running in Feast's virtualenv on one repository."""

    python: Path
    repo: Path
    log_path: Path
    process: subprocess.Popen[str] | None = None
    version: str = ""
    _log: IO[str] | None = None

    def start(self, timeout_s: float = 120.0) -> FeastSession:
        self._log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [str(self.python), str(RUNNER), str(self.repo)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=self.repo,
            start_new_session=True,
        )
        hello = self._read()
        self.version = str(hello.get("version", ""))
        return self

    def _read(self) -> dict[str, Any]:
        """The next answer line; Feast's other output goes to the log."""
        if self.process is None or self.process.stdout is None:
            raise RuntimeError("feast runner not started")
        for line in self.process.stdout:
            if line.startswith(MARK):
                answer: dict[str, Any] = json.loads(line[len(MARK) :])
                if not answer.get("ok"):
                    raise RuntimeError(f"feast runner: {answer.get('error', answer)}")
                return answer
            if self._log is not None:
                self._log.write(line)
        self.process.wait(10)
        code = self.process.returncode
        raise RuntimeError(f"feast runner exited with {code}; the end of {self.log_path}:\n{log_tail(self.log_path)}")

    def call(self, command: dict[str, Any]) -> dict[str, Any]:
        """Send one command and wait for its answer."""
        if self.process is None or self.process.stdin is None:
            raise RuntimeError("feast runner not started")
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self._read()

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                self.call({"op": "quit"})
                self.process.wait(10)
            except (RuntimeError, OSError, subprocess.TimeoutExpired, ValueError):
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
