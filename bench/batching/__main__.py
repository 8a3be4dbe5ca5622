"""`python -m bench.batching`: does Fresco's dynamic batcher pay on a model where it should? A wide MLP
(batch-1 compute of a few ms) served by Fresco with its default batching, by Fresco with batching off,
and by MLServer with adaptive batching, loaded by perf_analyzer (batch-1 requests) at rising
concurrency. Prints rows/s, latency and the servers' CPU per row, then the goals. See README.md."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.batching.models import HIDDEN, build
from bench.goals import Goal, record, verdict
from bench.measure import CACHE, tree_cpu_seconds
from bench.predictor import ceiling
from bench.predictor.__main__ import (
    Contender,
    ServerRun,
    check_answers,
    finish_contender,
    fresco_process,
    load_contenders,
    mlserver_process,
    start_contender,
)
from bench.predictor.load import FULL_WINDOW, QUICK_WINDOW, Window
from bench.predictor.peers import PerfAnalyzer, SetupError, ensure_mlserver, ensure_perf_analyzer
from bench.predictor.spec import MLSERVER_OUTPUT_NAME, MODEL_NAME, OUTPUT_NAME

WORK = CACHE / "batching"
MLSERVER_BATCH = (32, 0.002)  # MLServer's adaptive batching: max_batch_size, max_batch_time (s)
SPEEDUP_TARGET = 5.0  # rows/s at the highest concurrency over c1
MLSERVER_TARGET = 1.5
P50_NOISE = 1.05  # "no worse" at c1, allowing this much run-to-run noise


@dataclass
class Cpu:
    """A server's CPU seconds over one perf_analyzer run, and the rows it answered (≈ rate × time)."""

    seconds: float
    rows: float

    @property
    def us_per_row(self) -> float:
        return self.seconds / self.rows * 1e6 if self.rows else float("nan")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.batching", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(c) for c in text.split(",") if c.strip()],
        default=None,
        help="comma-separated concurrencies, the highest judged against 1 (default 1,4,16,32; 1,32 with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="short perf_analyzer windows, concurrencies 1 and 32")
    parser.add_argument("--skip-mlserver", action="store_true", help="do not install or run MLServer")
    return parser.parse_args(argv)


def load_rotating(
    contenders: list[Contender], concurrencies: list[int], tool: PerfAnalyzer, window: Window, out_dir: Path
) -> dict[tuple[str, int], Cpu]:
    """Each server at each concurrency, the order rotating; the server's CPU over each run."""
    cpu: dict[tuple[str, int], Cpu] = {}
    for index, concurrency in enumerate(concurrencies):
        shift = index % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            process = contender.process.process
            if not contender.ready or process is None:
                continue
            before = tree_cpu_seconds(process.pid)
            load_contenders([contender], [concurrency], tool, window, out_dir)
            spent = tree_cpu_seconds(process.pid) - before
            result = contender.run.at(concurrency)
            if result is not None:
                cpu[(contender.run.key, concurrency)] = Cpu(spent, result.infer_per_s * result.seconds)
    return cpu


def table(contenders: list[Contender], concurrencies: list[int], cpu: dict[tuple[str, int], Cpu]) -> str:
    lines = [
        f"  {'server':<34} {'c':>3} {'rows/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'≈CPU µs/row':>12}",
    ]
    for concurrency in concurrencies:
        for contender in contenders:
            run = contender.run
            result = run.at(concurrency)
            if result is None:
                lines.append(f"  {run.label:<34} {concurrency:>3} {'failed':>9}")
                continue
            used = cpu.get((run.key, concurrency))
            lines.append(
                f"  {run.label:<34} {concurrency:>3} {result.infer_per_s:9.1f} {result.p50_ms:8.2f}"
                f" {result.p99_ms:8.2f} {used.us_per_row if used else float('nan'):12.0f}"
            )
    return "\n".join(lines)


def goals(runs: dict[str, ServerRun], concurrencies: list[int]) -> tuple[list[Goal], list[str]]:
    low, high = min(concurrencies), max(concurrencies)
    fresco, off, mlserver = runs["fresco"], runs["fresco-off"], runs.get("mlserver-batch")
    found: list[Goal] = []
    notes: list[str] = []

    first, last = fresco.at(low), fresco.at(high)
    if low != 1 or high < 32:
        found.append(Goal("rows/s at c32 ≥ 5× c1", "SKIP", f"concurrencies {concurrencies} lack 1 or 32", "≥ 5×"))
    elif first is None or last is None:
        found.append(Goal("rows/s at c32 ≥ 5× c1", "MISS", "a run failed", "≥ 5×", "fresco c1"))
    else:
        ratio = last.infer_per_s / first.infer_per_s
        found.append(
            Goal(
                f"rows/s at c{high} ≥ 5× c1",
                verdict(ratio >= SPEEDUP_TARGET),
                f"{ratio:.2f}× ({last.infer_per_s:.0f} / {first.infer_per_s:.0f} rows/s)",
                f"≥ {SPEEDUP_TARGET:g}×",
                "fresco c1",
                ratio,
            )
        )

    if mlserver is None:
        found.append(Goal("≥ 1.5× MLServer adaptive batching", "SKIP", "MLServer not run (--skip-mlserver)", "≥ 1.5×"))
    else:
        theirs, ours = mlserver.at(high), fresco.at(high)
        if theirs is None or ours is None:
            found.append(Goal("≥ 1.5× MLServer adaptive batching", "MISS", "a run failed", "≥ 1.5×", mlserver.label))
        else:
            ratio = ours.infer_per_s / theirs.infer_per_s
            found.append(
                Goal(
                    f"rows/s at c{high} ≥ 1.5× MLServer adaptive batching",
                    verdict(ratio >= MLSERVER_TARGET),
                    f"{ratio:.2f}× ({ours.infer_per_s:.0f} / {theirs.infer_per_s:.0f} rows/s)",
                    f"≥ {MLSERVER_TARGET:g}×",
                    mlserver.label,
                    ratio,
                )
            )
        best = max((r for r in mlserver.results if r.ok), key=lambda r: r.infer_per_s, default=None)
        if best is not None and ours is not None:
            notes.append(
                f"MLServer's best was {best.infer_per_s:.0f} rows/s at c{best.concurrency}; "
                f"Fresco at c{high} is {ours.infer_per_s / best.infer_per_s:.2f}× that"
            )

    on, alone = fresco.at(1), off.at(1)
    if on is None or alone is None:
        found.append(Goal("p50 at c1 no worse than batching off", "MISS", "a c1 run failed", "≤ 1×", off.label))
    else:
        ratio = on.p50_ms / alone.p50_ms
        found.append(
            Goal(
                "p50 at c1 no worse than batching off",
                verdict(ratio <= P50_NOISE),
                f"{ratio:.3f}× ({on.p50_ms:.2f} / {alone.p50_ms:.2f} ms)",
                f"≤ {P50_NOISE:g}× (5% run-to-run noise)",
                off.label,
                ratio,
            )
        )
    return found, notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    concurrencies: list[int] = args.concurrency or ([1, 32] if args.quick else [1, 4, 16, 32])
    window = QUICK_WINDOW if args.quick else FULL_WINDOW
    started = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    logs, out_dir = WORK / "logs", WORK / "perf_analyzer"

    print("== Peers (installed once under .cache/bench/)", flush=True)
    import joblib  # type: ignore[import-untyped]
    import sklearn

    try:
        tool = ensure_perf_analyzer(CACHE)
        mlserver_python = None
        if not args.skip_mlserver:
            mlserver_python = ensure_mlserver(CACHE, sklearn.__version__, joblib.__version__, np.__version__)
    except SetupError as err:
        print(f"bench.batching: setup failed: {err}", file=sys.stderr)
        return 2
    print(f"  perf_analyzer: {tool.binary} ({tool.version}); MLServer: {mlserver_python or 'skipped'}", flush=True)

    print("\n== Model", flush=True)
    files, repository_off = build(WORK / "models")
    widths = "→".join(str(w) for w in HIDDEN)
    print(
        f"  MLPRegressor 32→{widths}→1 fitted in {files.train_seconds:.1f}s, ONNX {files.big_model_bytes / 1e6:.0f} MB",
        flush=True,
    )
    compute = ceiling.measure(files.onnx_file, [1, 16, 32], 0.0 if args.quick else 1.0)
    for row in compute:
        print(
            f"  in process, 1 intra-op thread: batch {row.batch_size:<3} {row.us_per_call / 1000:7.2f} ms/call"
            f"  {row.rows_per_s:8.0f} rows/s",
            flush=True,
        )
    expected = ceiling.reference_outputs(files.onnx_file, files.sample)

    contenders = [
        Contender(
            ServerRun("fresco", "fresco, default batching"),
            fresco_process(files.fresco_repository, 1, logs / "fresco.log"),
            ready_line="predictor listening on",
            health=True,
            probes=1,
            check=lambda address: check_answers(address, MODEL_NAME, OUTPUT_NAME, files, expected),
        ),
        Contender(
            ServerRun("fresco-off", "fresco, batching off"),
            fresco_process(repository_off, 1, logs / "fresco-off.log"),
            ready_line="predictor listening on",
            health=True,
            probes=1,
            check=lambda address: check_answers(address, MODEL_NAME, OUTPUT_NAME, files, expected),
        ),
    ]
    if mlserver_python is not None:
        size, delay = MLSERVER_BATCH
        contenders.append(
            Contender(
                ServerRun("mlserver-batch", f"mlserver, adaptive {size}/{delay * 1000:g}ms"),
                mlserver_process(mlserver_python, files, WORK / "mlserver", size, delay, logs / "mlserver.log"),
                ready_line=None,
                health=False,
                probes=1,
                check=lambda address: check_answers(address, MODEL_NAME, MLSERVER_OUTPUT_NAME, files, expected),
            )
        )

    print(f"\n== Servers under perf_analyzer (batch-1 requests, concurrency {','.join(map(str, concurrencies))})")
    cpu: dict[tuple[str, int], Cpu] = {}
    try:
        for contender in contenders:
            start_contender(contender)
        cpu = load_rotating(contenders, concurrencies, tool, window, out_dir)
    finally:
        print("-- stopping the servers", flush=True)
        for contender in contenders:
            finish_contender(contender, concurrencies)

    print(f"\n== Results ({time.perf_counter() - started:.0f}s, load average {os.getloadavg()[0]:.1f})")
    print(table(contenders, concurrencies, cpu))
    for contender in contenders:
        run = contender.run
        print(f"  {run.label}: answers {run.answers}" + (f"; {run.error}" if run.error else ""))
    found, notes = goals({c.run.key: c.run for c in contenders}, concurrencies)
    notes.append(
        "≈CPU µs/row: the server process tree's CPU over the whole perf_analyzer run over its rate × the run's length"
    )
    record("batching", found, quick=args.quick, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
