"""Load from perf_analyzer: one run per server and concurrency, batch-1 requests over gRPC, its CSV
parsed into throughput and latency percentiles. A run that fails or hangs is recorded as failed, with
the tail of its output, and the benchmark goes on."""

from __future__ import annotations

import csv
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench.predictor.peers import PerfAnalyzer
from bench.predictor.protocol import model_config
from bench.predictor.spec import FEATURES, INPUT_NAME, MODEL_NAME


@dataclass(frozen=True)
class Window:
    """perf_analyzer's measurement settings: window length, stability threshold, most windows."""

    measurement_ms: int
    stability_pct: int
    max_trials: int

    @property
    def timeout_s(self) -> float:
        """Every window used, plus start-up and slack; past this the run is killed and marked failed."""
        return self.max_trials * self.measurement_ms / 1000 * 1.5 + 30

    def args(self) -> list[str]:
        return ["-p", str(self.measurement_ms), "-s", str(self.stability_pct), "-r", str(self.max_trials)]

    def relaxed(self) -> Window:
        """The same windows accepting twice the deviation, for one retry of an unstable run."""
        return Window(self.measurement_ms, self.stability_pct * 2, self.max_trials)


FULL_WINDOW = Window(2000, 50, 6)
QUICK_WINDOW = Window(1000, 50, 4)
UNSTABLE = "Failed to obtain stable measurement"


@dataclass
class LoadResult:
    """One perf_analyzer run against one server at one concurrency."""

    server: str
    concurrency: int
    ok: bool = False
    infer_per_s: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    seconds: float = 0.0
    note: str = ""
    error: str = ""
    load_average: float = 0.0
    """The machine's 1-minute load average when the run started (other work on the machine skews results)."""
    command: list[str] = field(default_factory=list)
    requests: int = 0
    """Requests the server answered during the run (its own count), when it was counted."""
    cpu_us_per_request: float = 0.0
    """The server's process tree CPU time over the run divided by `requests`, in µs."""
    csv_row: dict[str, str] = field(default_factory=dict)


def shape_args(address: str) -> list[str]:
    """`--shape` for the input when the server's model config leaves a dimension variable.

    A batching model (max_batch_size > 0) declares [32] without the batch dimension and needs nothing;
    a model declared without batching has [-1, 32], which perf_analyzer needs pinned to [1, 32].
    """
    try:
        config = model_config(address, MODEL_NAME).config
    except grpc.RpcError:
        return []  # perf_analyzer will fail on the same call and say why
    for tensor in config.input:
        if tensor.name != INPUT_NAME or all(dim >= 0 for dim in tensor.dims):
            continue
        if config.max_batch_size > 0:  # dims leave the batch dimension out: a variable one is the features
            dims = [FEATURES if dim < 0 else dim for dim in tensor.dims]
        else:  # dims start with the batch dimension
            dims = [(1 if i == 0 else FEATURES) if dim < 0 else dim for i, dim in enumerate(tensor.dims)]
        return ["--shape", f"{INPUT_NAME}:{','.join(str(dim) for dim in dims)}"]
    return []


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_perf_analyzer(
    tool: PerfAnalyzer, server: str, address: str, concurrency: int, window: Window, out_dir: Path
) -> LoadResult:
    """One perf_analyzer run: `-b 1 --concurrency-range C`, random FP32 input, results from its CSV.

    `server` is a short key (e.g. `fresco`); the CSV and the output land in `out_dir` under it. A run
    that finds no stable window is retried once accepting twice the deviation, and says so in `note`.
    """
    result = _run_once(tool, server, address, concurrency, window, out_dir)
    if not result.ok and UNSTABLE in result.error:
        relaxed = window.relaxed()
        retry = _run_once(tool, server, address, concurrency, relaxed, out_dir)
        retry.seconds += result.seconds
        retry.note = f"unstable at -s {window.stability_pct}; retried with -s {relaxed.stability_pct}"
        return retry
    return result


def _run_once(
    tool: PerfAnalyzer, server: str, address: str, concurrency: int, window: Window, out_dir: Path
) -> LoadResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{server}-c{concurrency}"
    csv_path = out_dir / f"{stem}.csv"
    csv_path.unlink(missing_ok=True)
    command = [
        str(tool.binary),
        "-i",
        "grpc",
        "-u",
        address,
        "-m",
        MODEL_NAME,
        "-b",
        "1",
        "--concurrency-range",
        str(concurrency),
        *window.args(),
        "--input-data",
        "random",
        *shape_args(address),
        "-f",
        str(csv_path),
    ]
    result = LoadResult(server, concurrency, command=command, load_average=os.getloadavg()[0])
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=window.timeout_s, env={**os.environ, **tool.env()}
        )
    except subprocess.TimeoutExpired as err:
        result.seconds = time.perf_counter() - start
        output = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        result.error = f"timed out after {window.timeout_s:.0f}s\n{_tail(output)}"
        return result
    result.seconds = time.perf_counter() - start
    (out_dir / f"{stem}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0 or not csv_path.exists():
        result.error = f"exit {done.returncode}\n{_tail(done.stdout + done.stderr)}"
        return result
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        result.error = f"empty CSV {csv_path}\n{_tail(done.stdout + done.stderr)}"
        return result
    row = rows[-1]
    result.csv_row = dict(row)
    try:
        result.infer_per_s = float(row["Inferences/Second"])
        result.p50_ms = float(row["p50 latency"]) / 1000
        result.p90_ms = float(row["p90 latency"]) / 1000
        result.p95_ms = float(row["p95 latency"]) / 1000
        result.p99_ms = float(row["p99 latency"]) / 1000
    except (KeyError, ValueError) as err:
        result.error = f"unexpected CSV {csv_path}: {err!r}; columns {list(row)}"
        return result
    result.ok = True
    return result
