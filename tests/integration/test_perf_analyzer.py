"""Triton's perf_analyzer, unchanged, loads the predictor: it reads the model's metadata and config,
sends a few seconds of batch-1 requests over gRPC at concurrency 2, and writes its CSV.

perf_analyzer is the C++ binary shipped in the tritonclient wheel (the dev extra installs it next
to the venv's python). It links libcudart.so.12 even on a CPU-only machine, which the PyPI package
nvidia-cuda-runtime-cu12 provides, and libb64.so.0d, from the Debian package libb64-0d. CI installs
all three; a machine without them fails here saying what to install, rather than skipping."""

from __future__ import annotations

import csv
import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from fresco.api.inference import grpc_service_pb2 as pb
from fresco.api.inference import grpc_service_pb2_grpc as pb_grpc
from fresco.suite import ServiceProcess

pytestmark = pytest.mark.integration

CUDART = "libcudart.so.12"
# What provides each shared library perf_analyzer may miss.
PROVIDERS = {
    CUDART: "the PyPI package nvidia-cuda-runtime-cu12 (`pip install nvidia-cuda-runtime-cu12`)",
    "libb64.so.0d": "the Debian package libb64-0d (`apt-get install libb64-0d`)",
}
TIMEOUT_S = 60


def perf_analyzer() -> Path:
    """The binary next to this venv's python, else on PATH; a failure saying what to install."""
    beside = Path(sys.executable).parent / "perf_analyzer"
    if beside.exists():
        return beside
    found = shutil.which("perf_analyzer")
    if found is None:
        pytest.fail(
            f"perf_analyzer is neither in {beside.parent} nor on PATH: install the tritonclient wheel, which "
            "ships it (`pip install -e '.[dev]'`, or `pip install 'tritonclient[grpc]>=2.41'`)."
        )
    return Path(found)


def cuda_runtime_dir() -> Path | None:
    """The directory of the nvidia-cuda-runtime-cu12 wheel's libcudart.so.12 in site-packages."""
    for entry in dict.fromkeys([*site.getsitepackages(), *sys.path]):
        candidate = Path(entry) / "nvidia" / "cuda_runtime" / "lib"
        if (candidate / CUDART).exists():
            return candidate
    return None


def missing_libraries(binary: Path, env: dict[str, str]) -> list[str]:
    """The shared libraries of `binary` the dynamic linker would not find in `env`."""
    if shutil.which("ldd") is None:
        return []  # perf_analyzer itself will say, and the test shows its output
    listing = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env, check=False).stdout
    return [line.split()[0] for line in listing.splitlines() if "not found" in line]


def environment() -> tuple[Path, dict[str, str]]:
    """perf_analyzer and the environment it runs in, its shared libraries all found; else a failure
    saying what to install."""
    binary = perf_analyzer()
    library_path = [str(found)] if (found := cuda_runtime_dir()) else []
    if os.environ.get("LD_LIBRARY_PATH"):
        library_path.append(os.environ["LD_LIBRARY_PATH"])
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": os.pathsep.join(library_path),
        # One gRPC connection per concurrent request, as the benchmark runs it.
        "TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT": "1",
    }
    if missing := missing_libraries(binary, env):
        needed = "; ".join(f"{lib}: install {PROVIDERS.get(lib, 'a package providing it')}" for lib in missing)
        pytest.fail(f"{binary} misses shared libraries (none in site-packages nor on LD_LIBRARY_PATH). {needed}.")
    return binary, env


def demo_statistics(stub: pb_grpc.GRPCInferenceServiceStub) -> pb.ModelStatistics:
    (stats,) = stub.ModelStatistics(pb.ModelStatisticsRequest(name="demo"), timeout=10).model_stats
    return stats


def test_perf_analyzer_loads_the_predictor(
    predictor: ServiceProcess, predictor_stub: pb_grpc.GRPCInferenceServiceStub, tmp_path: Path
) -> None:
    binary, env = environment()
    report = tmp_path / "out.csv"
    command = [
        str(binary),
        *("-i", "grpc", "-u", predictor.address, "-m", "demo"),
        *("--shape", "X:8", "-b", "1", "--concurrency-range", "2"),
        *("-p", "1000", "-s", "80", "-r", "4"),
        *("-f", str(report)),
    ]
    before = demo_statistics(predictor_stub)
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"perf_analyzer did not finish within {TIMEOUT_S}s; its output:\n{err.stdout!r}\n{err.stderr!r}")
    after = demo_statistics(predictor_stub)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{output}"

    with report.open(newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["Concurrency"] == "2", row
    assert float(row["Inferences/Second"]) > 0, row
    assert 0 < float(row["p50 latency"]) <= float(row["p99 latency"]), row

    # Every request perf_analyzer counted in its measurement windows reached the model, and more
    # (warm-up and the requests between windows), each a batch of one row.
    measured = [int(n) for n in re.findall(r"Request count: (\d+)", output)]
    assert measured, output
    assert measured[-1] > 0, output
    inferences = after.inference_count - before.inference_count
    succeeded = after.inference_stats.success.count - before.inference_stats.success.count
    assert inferences >= measured[-1], (inferences, measured, output)
    assert succeeded == inferences
    assert after.inference_stats.fail.count == before.inference_stats.fail.count
    assert after.execution_count > before.execution_count

    # perf_analyzer reads the server's own statistics only from a server advertising the "statistics"
    # extension; when the predictor does, the two must agree.
    extensions = predictor_stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=5).extensions
    if "statistics" in extensions:
        server = re.search(r"Server:\s*\n\s*Inference count: (\d+)", output)
        assert server is not None, output
        assert 0 < int(server[1]) <= inferences, output
