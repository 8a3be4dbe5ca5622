"""The benchmark's peers, installed once under `.cache/bench/` and reused: MLServer in its own
virtualenv (its pins clash with Fresco's), and perf_analyzer, the C++ load generator that ships inside
the tritonclient 2.41.0 wheel, with the two shared libraries it needs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.predictor.servers import log_tail

MLSERVER_PACKAGES = ("mlserver==1.7.1", "mlserver-sklearn==1.7.1", "uvloop==0.21.0")
"""uvloop 0.23 kills MLServer's workers at start ("no current event loop"), hence the pin."""
PERF_ANALYZER_PACKAGES = ("tritonclient[all]==2.41.0", "nvidia-cuda-runtime-cu12")
"""The wheel's bin/perf_analyzer links libcudart.so.12 even on CPU; the nvidia wheel provides it."""
LIBB64 = "libb64.so.0d"
LIBB64_DEB = "libb64-0d"


class SetupError(RuntimeError):
    """A peer could not be installed; the message says what to do."""


@dataclass(frozen=True)
class PerfAnalyzer:
    """The perf_analyzer binary and the environment it runs in."""

    binary: Path
    library_dirs: tuple[Path, ...]
    version: str

    def env(self) -> dict[str, str]:
        """LD_LIBRARY_PATH for libcudart, and one gRPC connection per concurrent request.

        Triton's client shares one channel among up to 6 clients by default, so concurrency 4 would be
        one TCP connection, all of it landing on one worker of a multi-process server. One connection
        per in-flight request is what many independent callers look like.
        """
        paths = [str(p) for p in self.library_dirs]
        if os.environ.get("LD_LIBRARY_PATH"):
            paths.append(os.environ["LD_LIBRARY_PATH"])
        return {"LD_LIBRARY_PATH": os.pathsep.join(paths), "TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT": "1"}


def _run(command: list[str], log: Path, what: str, env: dict[str, str] | None = None) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"$ {' '.join(command)}\n".encode())
        out.flush()
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    if code != 0:
        raise SetupError(f"{what} failed (exit {code}); the end of {log}:\n{log_tail(log)}")


def ensure_venv(path: Path, packages: list[str], log: Path) -> Path:
    """A virtualenv at `path` holding exactly `packages` (re-created when the list changes); its python."""
    python = path / "bin" / "python"
    marker = path / ".bench-packages"
    wanted = "\n".join(packages)
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    if path.exists():
        shutil.rmtree(path)
    print(f"  installing {' '.join(packages)} into {path} (once; log {log})", flush=True)
    _run([sys.executable, "-m", "venv", str(path)], log, f"creating the virtualenv {path}")
    _run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--quiet", *packages],
        log,
        f"pip install into {path}",
    )
    marker.write_text(wanted)
    return python


def ensure_mlserver(cache: Path, sklearn_version: str, joblib_version: str, numpy_version: str) -> Path:
    """MLServer 1.7 with its scikit-learn runtime, pinned to the scikit-learn (and joblib, numpy) that
    pickled the model so it loads unchanged; the virtualenv's python."""
    packages = [
        *MLSERVER_PACKAGES,
        f"scikit-learn=={sklearn_version}",
        f"joblib=={joblib_version}",
        f"numpy=={numpy_version}",
    ]
    return ensure_venv(cache / "mlserver-venv", packages, cache / "logs" / "setup-mlserver.log")


def _missing_libraries(binary: Path, env: dict[str, str]) -> list[str]:
    result = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env={**os.environ, **env})
    return [line.split()[0] for line in result.stdout.splitlines() if "not found" in line]


def _install_libb64(log: Path) -> None:
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        why = "apt-get is not available" if apt is None else "this is not root"
        raise SetupError(
            f"perf_analyzer needs {LIBB64} and {why}; install the Debian/Ubuntu package {LIBB64_DEB} "
            f"(`sudo apt-get install {LIBB64_DEB}`), or put a {LIBB64} on LD_LIBRARY_PATH, then run again."
        )
    print(f"  installing {LIBB64_DEB} with apt-get (log {log})", flush=True)
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    try:
        _run([apt, "install", "-y", "-q", LIBB64_DEB], log, f"apt-get install {LIBB64_DEB}", env)
    except SetupError:
        # A fresh machine has no package lists yet.
        _run([apt, "update", "-q"], log, "apt-get update", env)
        _run([apt, "install", "-y", "-q", LIBB64_DEB], log, f"apt-get install {LIBB64_DEB}", env)


def ensure_perf_analyzer(cache: Path) -> PerfAnalyzer:
    """perf_analyzer from the tritonclient 2.41.0 wheel, with libcudart (PyPI) and libb64 (apt)."""
    log = cache / "logs" / "setup-perf-analyzer.log"
    venv = cache / "perf-analyzer-venv"
    ensure_venv(venv, list(PERF_ANALYZER_PACKAGES), log)
    binary = venv / "bin" / "perf_analyzer"
    if not binary.exists():
        raise SetupError(f"{PERF_ANALYZER_PACKAGES[0]} installed no bin/perf_analyzer under {venv}")
    found = sorted(venv.glob("lib/python*/site-packages/nvidia/cuda_runtime/lib/libcudart.so.12"))
    if not found:
        raise SetupError(f"{PERF_ANALYZER_PACKAGES[1]} installed no libcudart.so.12 under {venv} (see {log})")
    tool = PerfAnalyzer(binary, (found[0].parent,), "")
    missing = _missing_libraries(binary, tool.env())
    if LIBB64 in missing:
        _install_libb64(log)
        missing = _missing_libraries(binary, tool.env())
    if missing:
        raise SetupError(f"perf_analyzer still misses shared libraries: {', '.join(missing)}")
    result = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, env={**os.environ, **tool.env()}, check=False
    )
    if result.returncode != 0:
        raise SetupError(f"{binary} --version failed:\n{result.stdout}{result.stderr}")
    version = (result.stdout + result.stderr).strip().splitlines()
    return PerfAnalyzer(binary, tool.library_dirs, version[-1] if version else "perf_analyzer")
