"""`python -m bench.predictor`: Fresco's predictor against MLServer and a do-nothing gRPC floor on this
machine, loaded by perf_analyzer over the inference protocol; plus the in-process ONNX Runtime ceiling
and the load time of a ~10 MB model. Prints a table and the targets, and writes every raw figure to
`.cache/bench/predictor-results.json`. See README.md beside this file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.goals import record
from bench.predictor import ceiling, cpu, report
from bench.predictor.cpu import CpuMeter, charge
from bench.predictor.floor_server import read_counts
from bench.predictor.load import FULL_WINDOW, QUICK_WINDOW, LoadResult, Window, run_perf_analyzer
from bench.predictor.loadtime import LoadTimes, time_loads
from bench.predictor.models import ModelFiles, build_models, mlserver_model_settings
from bench.predictor.peers import PerfAnalyzer, SetupError, ensure_mlserver, ensure_perf_analyzer
from bench.predictor.protocol import answered, infer_rows, model_config_response
from bench.predictor.servers import ServerFailed, ServerProcess, free_port
from bench.predictor.spec import MLSERVER_OUTPUT_NAME, MODEL_NAME, OUTPUT_NAME

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE = REPO_ROOT / ".cache" / "bench"
RESULTS_FILE = CACHE / "predictor-results.json"
STARTUP_TIMEOUT_S = 120.0
CEILING_BATCHES = [1, 4, 16, 64]
MLSERVER_BATCH = (64, 0.002)  # adaptive batching: max_batch_size, max_batch_time (s)
ANSWER_TOLERANCE = 1e-4


@dataclass
class ServerRun:
    """One server under load: how it was started, whether its answers were right, and each run."""

    key: str
    label: str
    workers: int = 1
    command: list[str] = field(default_factory=list)
    startup_s: float = 0.0
    answers: str = "not checked"
    error: str = ""
    results: list[LoadResult] = field(default_factory=list)

    def at(self, concurrency: int) -> LoadResult | None:
        """The successful run at `concurrency`, if any."""
        return next((r for r in self.results if r.concurrency == concurrency and r.ok), None)


@dataclass
class Results:
    """Everything one benchmark run measured."""

    meta: dict[str, Any]
    concurrencies: list[int]
    fresco_workers: int
    ceiling: list[ceiling.CeilingResult] = field(default_factory=list)
    servers: list[ServerRun] = field(default_factory=list)
    load_times: LoadTimes | None = None
    targets: list[report.Target] = field(default_factory=list)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.predictor", description=(__doc__ or "").split("\n\n")[0].replace("\n", " ")
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes of Fresco and the floor (default 2)")
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(c) for c in text.split(",") if c.strip()],
        default=None,
        help="comma-separated concurrencies (default 1,4,16,64; 1,16 with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="short perf_analyzer windows and fewer concurrencies")
    parser.add_argument("--skip-mlserver", action="store_true", help="do not install or run MLServer")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.concurrency is not None and (not args.concurrency or min(args.concurrency) < 1):
        parser.error("--concurrency needs positive integers, e.g. 1,4,16,64")
    return args


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("grpcio", "onnxruntime", "numpy", "scikit-learn", "skl2onnx", "uvloop", "protobuf"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "missing"
    return found


def _git_revision() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def predictor_help() -> str:
    """What `python -m predictor --help` prints: the flags this checkout's predictor has."""
    done = subprocess.run(
        [sys.executable, "-m", "predictor", "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    return done.stdout


def check_answers(address: str, model: str, output: str, files: ModelFiles, expected: np.ndarray) -> str:
    """Send the sample rows and compare with ONNX Runtime in process."""
    try:
        got = infer_rows(address, model, files.sample, output)
    except (grpc.RpcError, ValueError) as err:
        return f"check failed: {err}"
    if got.shape != expected.shape:
        return f"DIFFER: {got.shape[0]} values for {expected.shape[0]} rows"
    diff = float(np.max(np.abs(got - expected)))
    return f"{'match' if diff <= ANSWER_TOLERANCE else 'DIFFER'} (max |diff| {diff:.1e} on {len(got)} rows)"


@dataclass
class Contender:
    """A server of the comparison: its record, its process, and how to tell it is ready."""

    run: ServerRun
    process: ServerProcess
    ready_line: str | None
    health: bool
    probes: int
    check: Callable[[str], str] | None
    ready: bool = False
    meter: CpuMeter | None = None
    only_at: frozenset[int] | None = None
    """The concurrencies this server is loaded at (None: all)."""


def start_contender(contender: Contender) -> None:
    """Start a server, wait until every worker is ready, and check its answers; a failure is recorded."""
    run, process = contender.run, contender.process
    run.command = list(process.command)
    print(f"-- {run.label}: {' '.join(process.command[:8])}{' …' if len(process.command) > 8 else ''}", flush=True)
    start = time.perf_counter()
    try:
        process.start()
        if contender.ready_line:
            process.wait_for_line(contender.ready_line, STARTUP_TIMEOUT_S)
        process.wait_ready(MODEL_NAME, STARTUP_TIMEOUT_S, health=contender.health, probes=contender.probes)
    except (ServerFailed, OSError) as err:
        run.error = str(err)
        print(f"   FAILED: {err}", flush=True)
        process.stop()
        return
    run.startup_s = time.perf_counter() - start
    contender.ready = True
    print(f"   ready in {run.startup_s:.1f}s on {process.address}", flush=True)
    if contender.check is not None:
        run.answers = contender.check(process.address)
        print(f"   answers vs ONNX Runtime in process: {run.answers}", flush=True)


def load_contenders(
    contenders: list[Contender], concurrencies: list[int], tool: PerfAnalyzer, window: Window, out_dir: Path
) -> None:
    """Every server at each concurrency in turn, the order rotating, so that whatever else the machine
    does at a given moment weighs on all servers alike rather than on whichever ran then."""
    for index, concurrency in enumerate(concurrencies):
        print(f"-- concurrency {concurrency}", flush=True)
        shift = index % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            run = contender.run
            if not contender.ready or (contender.only_at is not None and concurrency not in contender.only_at):
                continue
            try:
                contender.process.check_alive()
            except ServerFailed as err:
                run.error, contender.ready = str(err), False
                print(f"   {run.label}: FAILED: {err}", flush=True)
                continue
            before = contender.meter.read() if contender.meter else None
            result = run_perf_analyzer(tool, run.key, contender.process.address, concurrency, window, out_dir)
            if contender.meter is not None:
                charge(result, before, contender.meter.read())
            run.results.append(result)
            if result.ok:
                cpu_text = f"  {result.cpu_us_per_request:5.0f} µs CPU/req" if result.cpu_us_per_request else ""
                print(
                    f"   {run.label:<28} {result.infer_per_s:9.1f} infer/s  p50 {result.p50_ms:7.2f} ms"
                    f"  p99 {result.p99_ms:7.2f} ms{cpu_text}  ({result.seconds:.0f}s, load {result.load_average:.1f})"
                    + (f"  [{result.note}]" if result.note else ""),
                    flush=True,
                )
            else:
                tail = "\n".join(f"      {line}" for line in result.error.splitlines())
                print(f"   {run.label:<28} FAILED after {result.seconds:.0f}s:\n{tail}", flush=True)


def finish_contender(contender: Contender, concurrencies: list[int]) -> None:
    """Stop the server and mark every concurrency it was not measured at."""
    run = contender.run
    code = contender.process.stop()
    if contender.process.process is not None:
        print(f"   {run.label}: stopped (exit {code})", flush=True)
    measured = {r.concurrency for r in run.results}
    for concurrency in sorted(contender.only_at or concurrencies):
        if concurrency not in measured:
            reason = f"not run: {run.error.splitlines()[0]}" if run.error else "not run"
            run.results.append(LoadResult(run.key, concurrency, error=reason))
    run.results.sort(key=lambda r: r.concurrency)


def fresco_process(repository: Path, workers: int, log: Path, extra: list[str] | None = None) -> ServerProcess:
    port = free_port()
    command = [sys.executable, "-m", "predictor", "--model-repository", str(repository), "--port", str(port)]
    if workers > 1:
        command += ["--workers", str(workers)]
    return ServerProcess("fresco predictor", [*command, *(extra or [])], port, log, cwd=REPO_ROOT)


def mlserver_process(
    python: Path, files: ModelFiles, directory: Path, max_batch_size: int, max_batch_time_s: float, log: Path
) -> ServerProcess:
    """MLServer in its own directory: settings.json (parallel_workers 0, no access log, no metrics),
    the model with its model-settings.json, and the ModelConfig answer for perf_analyzer."""
    if directory.exists():
        shutil.rmtree(directory)
    shutil.copytree(files.mlserver_model_dir, directory / MODEL_NAME)
    settings = mlserver_model_settings(max_batch_size, max_batch_time_s)
    (directory / MODEL_NAME / "model-settings.json").write_text(json.dumps(settings, indent=2))
    port = free_port()
    server_settings = {
        "debug": False,  # True (its default) adds an access-log interceptor to every call
        "parallel_workers": 0,  # inference in the server process: its fastest on this machine
        "host": "127.0.0.1",
        "grpc_port": port,
        "http_port": free_port(),
        "metrics_endpoint": None,  # no Prometheus interceptor nor metrics server
        "metrics_port": free_port(),
    }
    (directory / "settings.json").write_text(json.dumps(server_settings, indent=2))
    config = model_config_response(output_name=MLSERVER_OUTPUT_NAME, platform="mlserver_sklearn")
    (directory / "model-config.bin").write_bytes(config.SerializeToString())
    launcher = Path(__file__).with_name("mlserver_launcher.py")
    command = [str(python), str(launcher), "model-config.bin", "start", "."]
    return ServerProcess("mlserver", command, port, log, cwd=directory)


def floor_process(workers: int, log: Path, count_dir: Path, model: Path | None = None) -> ServerProcess:
    """The floor, or with `model` the hand-rolled server, counting its ModelInfer calls in `count_dir`."""
    port = free_port()
    module = "bench.predictor.handrolled_server" if model else "bench.predictor.floor_server"
    command = [sys.executable, "-m", module, "--port", str(port), "--workers", str(workers)]
    count_dir.mkdir(parents=True, exist_ok=True)
    command += ["--count-dir", str(count_dir), *(["--model", str(model)] if model else [])]
    return ServerProcess("handrolled" if model else "floor", command, port, log, cwd=REPO_ROOT)


def _pid_of(process: ServerProcess) -> Callable[[], int | None]:
    return lambda: process.process.pid if process.process is not None else None


def fresco_contender(files: ModelFiles, workers: int, key: str, logs: Path, expected: np.ndarray) -> Contender:
    process = fresco_process(files.fresco_repository, workers, logs / f"{key}.log")
    return Contender(
        ServerRun(key, f"fresco ({workers} worker{'s' if workers > 1 else ''})", workers),
        process,
        ready_line="predictor listening on",
        health=True,
        probes=8 * workers if workers > 1 else 1,
        check=lambda address: check_answers(address, MODEL_NAME, OUTPUT_NAME, files, expected),
        meter=CpuMeter(_pid_of(process), lambda: answered(process.address, MODEL_NAME)),
    )


def peer_contender(kind: str, workers: int, key: str, work: Path, files: ModelFiles, expected: np.ndarray) -> Contender:
    """The floor or the hand-rolled server (`kind`) with `workers` processes."""
    count_dir = work / "counts" / key
    model = files.onnx_file if kind == "handrolled" else None
    process = floor_process(workers, work / "logs" / f"{key}.log", count_dir, model)
    return Contender(
        ServerRun(key, f"{kind} ({workers} worker{'s' if workers > 1 else ''})", workers),
        process,
        ready_line=f"{kind} listening on",
        health=False,
        probes=8 * workers if workers > 1 else 1,
        check=(lambda address: check_answers(address, MODEL_NAME, OUTPUT_NAME, files, expected)) if model else None,
        meter=CpuMeter(_pid_of(process), lambda: read_counts(count_dir)),
    )


def measure_load_times(
    files: ModelFiles, work: Path, workers: int, control_flags: list[str], repeats: int
) -> LoadTimes | None:
    """A predictor on a repository holding only the small model; the big one copied in, then loaded."""
    repository = work / "loadtime-repository"
    shutil.copytree(files.fresco_repository, repository)
    process = fresco_process(repository, workers, work / "logs" / "fresco-loadtime.log", control_flags)
    print(f"-- fresco predictor ({workers} worker{'s' if workers > 1 else ''}) on {repository}", flush=True)
    try:
        process.start()
        process.wait_for_line("predictor listening on", STARTUP_TIMEOUT_S)
        process.wait_ready(MODEL_NAME, STARTUP_TIMEOUT_S, health=True, probes=8 * workers if workers > 1 else 1)
        times = time_loads(process.address, repository, files.big_model_dir, files.big_model_bytes, repeats)
    except (ServerFailed, OSError) as err:
        print(f"   FAILED: {err}", flush=True)
        return LoadTimes(files.big_model_bytes, error=str(err))
    finally:
        process.stop()
    for attempt, seconds in enumerate(times.seconds, 1):
        print(f"   load {attempt}: {seconds:.3f} s", flush=True)
    if times.error:
        print(f"   FAILED: {times.error}", flush=True)
    return times


def run_benchmark(args: argparse.Namespace) -> Results:
    quick: bool = args.quick
    load_average = os.getloadavg()[0]
    concurrencies: list[int] = args.concurrency or ([1, 16] if quick else [1, 4, 16, 64])
    window = QUICK_WINDOW if quick else FULL_WINDOW
    work = CACHE / "predictor"
    if work.exists():
        shutil.rmtree(work)
    (work / "logs").mkdir(parents=True)
    out_dir = work / "perf_analyzer"

    step("Peers (installed once under .cache/bench/)")
    import joblib  # type: ignore[import-untyped]
    import sklearn

    tool = ensure_perf_analyzer(CACHE)
    print(f"  perf_analyzer: {tool.binary} ({tool.version})", flush=True)
    mlserver_python: Path | None = None
    if not args.skip_mlserver:
        mlserver_python = ensure_mlserver(CACHE, sklearn.__version__, joblib.__version__, np.__version__)
        print(f"  MLServer: {mlserver_python}", flush=True)

    flags = predictor_help()
    workers: int = args.workers
    if workers > 1 and "--workers" not in flags:
        print(f"  NOTE: `python -m predictor --help` has no --workers; Fresco runs 1 worker (asked {workers})")
        workers = 1
    control_flags = (
        ["--model-control-mode", "explicit", "--load-model", MODEL_NAME] if "--model-control-mode" in flags else []
    )

    results = Results(
        meta={
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "versions": {**_versions(), "perf_analyzer": tool.version},
            "git": _git_revision(),
            "load_average_at_start": load_average,
            "options": {
                "quick": quick,
                "workers_asked": args.workers,
                "skip_mlserver": args.skip_mlserver,
                "window": dataclasses.asdict(window),
            },
        },
        concurrencies=concurrencies,
        fresco_workers=workers,
    )

    step("Models")
    files = build_models(work / "models")
    expected = ceiling.reference_outputs(files.onnx_file, files.sample)
    print(
        f"  MLP 32→256→256→1 trained in {files.train_seconds:.1f}s, ONNX {files.onnx_file.stat().st_size / 1e3:.0f} kB;"
        f" load-time model {files.big_model_bytes / 1e6:.1f} MB",
        flush=True,
    )

    step("In-process ceiling: ONNX Runtime session.run, 1 thread, 1 intra-op thread")
    results.ceiling = ceiling.measure(files.onnx_file, CEILING_BATCHES, 0.3 if quick else 1.5)
    for row in results.ceiling:
        print(f"  batch {row.batch_size:<3} {row.rows_per_s:12,.0f} rows/s  {row.us_per_call:8.1f} µs/call", flush=True)

    step(f"Servers under perf_analyzer (batch 1, concurrency {','.join(map(str, concurrencies))})")
    logs = work / "logs"
    # One worker and `workers` workers of Fresco, the floor and the hand-rolled server: the N-worker
    # ones keep the keys the throughput report reads ("fresco", "floor").
    sets = [(1, "-1w"), (workers, "")] if workers > 1 else [(1, "")]
    contenders = []
    for count, suffix in sets:
        contenders.append(fresco_contender(files, count, f"fresco{suffix}", logs, expected))
        contenders.append(peer_contender("floor", count, f"floor{suffix}", work, files, expected))
        contenders.append(peer_contender("handrolled", count, f"handrolled{suffix}", work, files, expected))
    if mlserver_python is not None:
        size, delay = MLSERVER_BATCH
        for key, label, batch, batch_time in (
            ("mlserver", "mlserver, batching off", 0, 0.0),
            ("mlserver-batch", f"mlserver, batching {size}/{delay * 1000:g}ms", size, delay),
        ):
            contenders.append(
                Contender(
                    ServerRun(key, label),
                    mlserver_process(mlserver_python, files, work / key, batch, batch_time, logs / f"{key}.log"),
                    ready_line=None,
                    health=False,
                    probes=1,
                    check=lambda address: check_answers(address, MODEL_NAME, MLSERVER_OUTPUT_NAME, files, expected),
                    only_at=frozenset({16}),  # the goal compares at c16 only
                )
            )
    results.servers = [contender.run for contender in contenders]
    try:
        # All servers up at once (idle ones cost nothing), then loaded in turn at each concurrency.
        for contender in contenders:
            start_contender(contender)
        load_contenders(contenders, concurrencies, tool, window, out_dir)
    finally:
        print("-- stopping the servers", flush=True)
        for contender in contenders:
            finish_contender(contender, concurrencies)

    step(f"Load time: RepositoryModelLoad of a {files.big_model_bytes / 1e6:.1f} MB ONNX model, 3 times")
    results.load_times = measure_load_times(files, work, workers, control_flags, repeats=3)

    results.targets = report.targets(results.servers, results.load_times)
    return results


def to_jsonable(value: Any) -> Any:
    """Dataclasses (with properties like medians kept out) as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (REPO_ROOT / "predictor" / "__main__.py").exists():
        print(f"bench.predictor: expected the Fresco repository at {REPO_ROOT}", file=sys.stderr)
        return 2
    os.chdir(REPO_ROOT)
    started = time.perf_counter()
    try:
        results = run_benchmark(args)
    except SetupError as err:
        print(f"\nbench.predictor: setup failed: {err}", file=sys.stderr)
        return 2
    results.meta["seconds"] = round(time.perf_counter() - started, 1)
    text = report.render(
        results.servers, results.concurrencies, results.ceiling, results.load_times, results.targets, results.meta
    )
    text += "\n\n" + cpu.render_cpu(results.servers, results.concurrencies)
    print("\n" + text, flush=True)
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    payload = to_jsonable(results)
    if results.load_times is not None:
        payload["load_times"]["median_s"] = results.load_times.median_s
    payload["report"] = text
    RESULTS_FILE.write_text(json.dumps(payload, indent=2))
    print(f"\nRaw results: {RESULTS_FILE.relative_to(REPO_ROOT)}  (logs and CSVs under .cache/bench/predictor/)")
    record(
        "predictor",
        cpu.goals(results.servers, results.concurrencies, results.fresco_workers),
        quick=args.quick,
        notes=[
            "CPU/request: the server's process tree utime+stime from /proc over each perf_analyzer run, "
            "divided by the requests it counted in that run",
            "peers started in the same run, loaded in turn at each concurrency; MLServer at c16 only",
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
