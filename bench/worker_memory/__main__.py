"""Several cores without N× memory: the predictor with `--workers 4` against one worker on a ~200 MB
ONNX model, its weights shared across the workers (the default) and private to each
(`--shared-weights-min-bytes 0`). Resident memory of the whole process tree (RSS and PSS from
/proc/PID/smaps_rollup) after loading and after serving requests, CPU per request and latency, and
the answers of every configuration checked bit for bit against ONNX Runtime in process.

Run it with `python -m bench.worker_memory [--quick]` from the repository root.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from grpc import aio

from bench.goals import Goal, record, verdict
from bench.measure import CACHE, Memory, tree_cpu_seconds, tree_memory
from bench.predictor.__main__ import fresco_process
from bench.predictor.models import big_mlp_onnx, write_fresco_model
from bench.predictor.protocol import CHANNEL_OPTIONS, infer_rows
from bench.predictor.spec import FEATURES, INPUT_NAME, OUTPUT_NAME
from fresco.api.inference import grpc_service_pb2 as pb
from fresco.api.inference import grpc_service_pb2_grpc as pb_grpc

MODEL = "wide"
HIDDEN = (4096, 4096, 4096, 4096)  # 32·4096 + 3·4096² + 4096 ≈ 50.5M FP32 weights ≈ 202 MB
WORKDIR = CACHE / "worker_memory"
MB = 1e6


@dataclass
class Run:
    """One configuration: its memory after loading and after serving, and its load."""

    workers: int
    shared: bool
    start_s: float = 0.0
    loaded: Memory | None = None
    served: Memory | None = None
    cpu_per_request_ms: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    requests_per_s: float = 0.0
    answers: str = "not checked"
    per_process: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.workers} worker{'s' if self.workers > 1 else ''}, {'shared' if self.shared else 'private'}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.worker_memory", description=(__doc__ or "").split("\n\n")[0].replace("\n", " ")
    )
    parser.add_argument("--quick", action="store_true", help="fewer requests per configuration")
    parser.add_argument("--workers", type=int, default=4, help="workers of the multi-worker runs (default 4)")
    return parser.parse_args(argv)


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def build_model(name: str = "repository", hidden: tuple[int, ...] = HIDDEN) -> tuple[Path, bytes]:
    """A model repository (rebuilt only when missing: the weights are seeded) and the model's bytes."""
    repository = WORKDIR / name
    model_file = repository / MODEL / "1" / "model.onnx"
    if not model_file.is_file():
        shutil.rmtree(repository, ignore_errors=True)
        write_fresco_model(repository / MODEL, big_mlp_onnx(hidden=hidden))
    return repository, model_file.read_bytes()


def process_overhead(workers: int) -> Memory:
    """The tree's memory with a model of a few KB: what the processes cost without any weights."""
    repository, _ = build_model("tiny-repository", hidden=(16,))
    server = fresco_process(repository, workers, WORKDIR / "logs" / f"{workers}-tiny.log", ["--log-format", "text"])
    server.start()
    try:
        server.wait_ready(MODEL, timeout_s=300, probes=4 * workers)
        assert server.process is not None
        time.sleep(1.0)
        return tree_memory(server.process.pid)
    finally:
        server.stop()


async def load(address: str, rows: np.ndarray, requests: int, concurrency: int) -> list[float]:
    """`requests` batch-1 ModelInfer calls from `concurrency` clients, each on its own connection (so
    SO_REUSEPORT spreads them over the workers); the latency of each in seconds."""
    channels = [
        aio.insecure_channel(address, options=[*CHANNEL_OPTIONS, ("bench.worker_memory.client", i)])
        for i in range(concurrency)
    ]
    latencies: list[float] = []
    remaining = iter(range(requests))

    async def client(channel: aio.Channel) -> None:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for index in remaining:
            request = pb.ModelInferRequest(model_name=MODEL)
            request.inputs.add(name=INPUT_NAME, datatype="FP32", shape=[1, FEATURES])
            request.raw_input_contents.append(rows[index % len(rows)].tobytes())
            start = time.perf_counter()
            await stub.ModelInfer(request, timeout=60)
            latencies.append(time.perf_counter() - start)

    try:
        await asyncio.gather(*(client(channel) for channel in channels))
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    return latencies


def per_process(pid: int) -> list[str]:
    from bench.measure import descendants, memory

    lines = []
    for member in descendants(pid):
        try:
            figures = memory(member)
        except (OSError, KeyError):
            continue
        lines.append(f"pid {member}: RSS {figures.rss / MB:.0f} MB, PSS {figures.pss / MB:.0f} MB")
    return lines


def measure(
    run: Run, repository: Path, shared_dir: Path, rows: np.ndarray, expected: np.ndarray, requests: int
) -> None:
    extra = ["--shared-weights-dir", str(shared_dir), "--log-format", "text"]
    if not run.shared:
        extra += ["--shared-weights-min-bytes", "0"]
    log = WORKDIR / "logs" / f"{run.workers}-{'shared' if run.shared else 'private'}.log"
    server = fresco_process(repository, run.workers, log, extra)
    start = time.perf_counter()
    server.start()
    try:
        # Many successive probes on new connections: every worker has loaded the model.
        server.wait_ready(MODEL, timeout_s=600, probes=4 * run.workers)
        run.start_s = time.perf_counter() - start
        assert server.process is not None
        pid = server.process.pid
        time.sleep(1.0)
        run.loaded = tree_memory(pid)
        got = infer_rows(server.address, MODEL, rows[:8], OUTPUT_NAME)
        same = np.array_equal(got, expected)
        run.answers = "bit-identical" if same else f"DIFFER (max {np.abs(got - expected).max()})"
        concurrency = 2 * run.workers
        asyncio.run(load(server.address, rows, 2 * concurrency, concurrency))  # connections up, pages touched
        cpu_before, wall_before = tree_cpu_seconds(pid), time.perf_counter()
        latencies = asyncio.run(load(server.address, rows, requests, concurrency))
        cpu, wall = tree_cpu_seconds(pid) - cpu_before, time.perf_counter() - wall_before
        run.cpu_per_request_ms = cpu / requests * 1000
        run.requests_per_s = requests / wall
        ordered = sorted(latencies)
        run.p50_ms = statistics.median(ordered) * 1000
        run.p99_ms = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000
        run.served = tree_memory(pid)
        run.per_process = per_process(pid)
    finally:
        server.stop()


def fmt(memory: Memory | None) -> tuple[str, str]:
    if memory is None:
        return "-", "-"
    return f"{memory.rss / MB:,.0f}", f"{memory.pss / MB:,.0f}"


def report(runs: list[Run]) -> None:
    header = ("configuration", "start s", "RSS loaded", "PSS loaded", "RSS served", "PSS served")
    rows = [header]
    for run in runs:
        rows.append((run.label, f"{run.start_s:.1f}", *fmt(run.loaded), *fmt(run.served)))
    print("\nResident memory of the process tree, MB (supervisor and workers summed)")
    print_table(rows)
    rows = [("configuration", "CPU ms/request", "p50 ms", "p99 ms", "requests/s", "answers")]
    for run in runs:
        rows.append(
            (
                run.label,
                f"{run.cpu_per_request_ms:.2f}",
                f"{run.p50_ms:.1f}",
                f"{run.p99_ms:.1f}",
                f"{run.requests_per_s:.0f}",
                run.answers,
            )
        )
    print("\nServing (batch-1 ModelInfer, 2 clients per worker, each on its own connection)")
    print_table(rows)
    for run in runs:
        print(f"\n{run.label} after serving: " + "; ".join(run.per_process))


def print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        print("  " + "  ".join(cell.rjust(widths[i]) if i else cell.ljust(widths[i]) for i, cell in enumerate(row)))
        if index == 0:
            print("  " + "  ".join("-" * w for w in widths))


def ratio(many: Run, one: Run, kind: str) -> float:
    assert many.served is not None
    assert one.served is not None
    return float(getattr(many.served, kind) / getattr(one.served, kind))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    requests = 60 if args.quick else 240
    step(f"model: MLP {FEATURES} → {' → '.join(map(str, HIDDEN))} → 1, random FP32 weights")
    repository, model_bytes = build_model()
    print(f"model file {len(model_bytes) / MB:.0f} MB; {requests} measured requests per configuration")
    rows = np.random.default_rng(11).standard_normal((64, FEATURES)).astype(np.float32)
    reference = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    expected = reference.run([OUTPUT_NAME], {INPUT_NAME: rows[:8]})[0].astype(np.float64).reshape(-1)
    del reference
    shared_dir = WORKDIR / "shared-weights"
    shutil.rmtree(shared_dir, ignore_errors=True)  # the first start below pays for writing the entry
    runs = [Run(1, True), Run(args.workers, True), Run(1, False), Run(args.workers, False)]
    for run in runs:
        step(run.label)
        measure(run, repository, shared_dir, rows, expected, requests)
        assert run.served is not None
        print(f"started in {run.start_s:.1f}s; RSS {run.served.rss / MB:,.0f} MB, PSS {run.served.pss / MB:,.0f} MB")
    step("process overhead: the same trees serving a model of a few KB")
    bare_one, bare_many = process_overhead(1), process_overhead(args.workers)
    report(runs)
    bare = bare_many.pss / bare_one.pss
    print(
        f"\nWithout weights: 1 worker PSS {bare_one.pss / MB:,.0f} MB, {args.workers} workers (with the supervisor) "
        f"{bare_many.pss / MB:,.0f} MB, {bare:.2f}×; RSS {bare_one.rss / MB:,.0f} and {bare_many.rss / MB:,.0f} MB"
    )
    one, many, one_private, many_private = runs
    assert one.served is not None
    assert many.served is not None
    pss, rss = ratio(many, one, "pss"), ratio(many, one, "rss")
    pss_private, rss_private = ratio(many_private, one_private, "pss"), ratio(many_private, one_private, "rss")
    cpu = many.cpu_per_request_ms / many_private.cpu_per_request_ms
    cpu_one = one.cpu_per_request_ms / one_private.cpu_per_request_ms
    print(f"\n{args.workers} workers ÷ 1 worker, after serving: shared weights PSS {pss:.2f}× RSS {rss:.2f}×;")
    print(f"  private weights PSS {pss_private:.2f}× RSS {rss_private:.2f}×")
    print(f"CPU per request shared ÷ private: 1 worker {cpu_one:.2f}×, {args.workers} workers {cpu:.2f}×")
    answers_ok = all(run.answers == "bit-identical" for run in runs)
    goals = [
        Goal(
            f"{args.workers} workers' PSS < 1.5× one worker's (shared weights)",
            verdict(pss < 1.5),
            f"{pss:.2f}× ({many.served.pss / MB:,.0f} / {one.served.pss / MB:,.0f} MB; private: {pss_private:.2f}×)",
            "< 1.5×",
            peer="1 worker",
            ratio=pss,
        ),
        Goal(
            f"{args.workers} workers' RSS < 1.5× one worker's (shared weights)",
            verdict(rss < 1.5),
            f"{rss:.2f}× ({many.served.rss / MB:,.0f} / {one.served.rss / MB:,.0f} MB; private: {rss_private:.2f}×)",
            "< 1.5×",
            peer="1 worker",
            ratio=rss,
        ),
        Goal(
            "CPU per request unaffected by sharing",
            verdict(max(cpu, cpu_one) <= 1.10),
            f"{cpu_one:.2f}× (1 worker), {cpu:.2f}× ({args.workers} workers)",
            "≤ 1.10×",
            peer="private weights",
            ratio=max(cpu, cpu_one),
        ),
        Goal(
            "answers bit-identical to ONNX Runtime in process",
            verdict(answers_ok),
            "all 4 configurations" if answers_ok else "; ".join(f"{r.label}: {r.answers}" for r in runs),
            "bit-identical",
            peer="onnxruntime",
        ),
    ]
    notes = [
        "RSS summed over processes counts each shared page once per process that maps it, so no "
        "sharing scheme can bring it under N× for the shared part; PSS splits shared pages among "
        "their sharers and sums to the memory the tree actually holds.",
        f"model file {len(model_bytes) / MB:.0f} MB; memory read after {requests} batch-1 requests",
        f"without weights (a few-KB model) {args.workers} workers already hold {bare:.2f}× one worker's PSS "
        f"({bare_many.pss / MB:,.0f} / {bare_one.pss / MB:,.0f} MB): the shared weights add "
        f"{(many.served.pss - bare_many.pss) / MB:,.0f} MB to {args.workers} workers against "
        f"{(one.served.pss - bare_one.pss) / MB:,.0f} MB to one",
    ]
    record("worker_memory", goals, quick=args.quick, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
