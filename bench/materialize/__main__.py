"""Materialisation: Fresco's feature service (its Materialize RPC) against Feast (`FeatureStore.materialize`)
loading the same Parquet files, on SQLite and on Redis (+ Cassandra for Fresco), and the service's peak
memory for two file sizes. See README.md."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq  # type: ignore[import-untyped]

from bench.features import data, fresco_side
from bench.features.feast_peer import _cli as feast_cli
from bench.features.feast_peer import ensure_feast
from bench.goals import Goal, record, verdict
from bench.measure import CACHE, REPO_ROOT, machine_load, tree_cpu_seconds
from bench.predictor.peers import SetupError
from fresco.servers import CassandraNode, RedisServer, ServerError
from fresco.suite import ServiceFailed

WORK = CACHE / "materialize"
RUNNER = Path(__file__).with_name("feast_materialize.py")
ROW_GROUP_ROWS = 16_384
"""Row groups of the benchmark's files (both systems read the same files). A Parquet reader decodes a row group
at a time, so a file written as one row group costs its whole size whatever the chunk size."""
SPEEDUP_TARGET = 5.0
MEMORY_GROWTH_TARGET = 1.5
FRESCO_DB, FEAST_DB = 0, 1
KEYSPACE = "fresco_materialize_bench"
MARK = "@@ "


@dataclass
class Run:
    """One system loading both views' files."""

    system: str
    backend: str
    rows: int
    seconds: float
    cpu_s: float | None = None
    rss_before_mb: float | None = None
    peak_growth_mb: float | None = None
    store_cpu_s: dict[str, float] | None = None  # the servers behind it (Redis, Cassandra) by name

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.materialize", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="10,000 entities per view (smoke run, about a minute)")
    parser.add_argument("--entities", type=int, default=0, help="entities per view (default 100,000; quick 10,000)")
    parser.add_argument("--skip-feast", action="store_true", help="Fresco's figures only")
    parser.add_argument("--skip-cassandra", action="store_true", help="no Redis + Cassandra runs (SQLite only)")
    return parser.parse_args(argv)


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def dataset_of(directory: Path, entities: int) -> data.Dataset:
    """bench.features' data, its files rewritten with row groups of ROW_GROUP_ROWS rows (same rows, same order)."""
    dataset = data.generate(directory, entities)
    for path in dataset.files.values():
        pq.write_table(pq.read_table(path), path, row_group_size=ROW_GROUP_ROWS)
    return dataset


class RssPeak:
    """The largest resident set of one process, sampled every 20 ms from /proc while it runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_kb = max(self.peak_kb, self.rss_kb())
            except OSError:
                return
            self._stop.wait(0.02)

    def __enter__(self) -> RssPeak:
        self.peak_kb = self.rss_kb()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def fresco_run(
    label: str,
    backend: list[str],
    dataset: data.Dataset,
    log: Path,
    stores: Mapping[str, int] | None = None,
    l1: bool = True,
) -> Run:
    """A fresh feature service, both files through its Materialize RPC one after the other; wall time, the
    service's CPU (and the `stores` processes') and its peak RSS above what it held before. l1=False: the memory
    tier holds one record (--memory-max-entries 1), so the peak is the materialisation's own."""
    flags = ["--materialize-source-dirs", str(next(iter(dataset.files.values())).parent.resolve())]
    service = fresco_side.start_service(label, backend, [*flags, *([] if l1 else ["--memory-max-entries", "1"])], log)
    try:
        pid = service.process.process.pid  # type: ignore[union-attr]
        stores = stores or {}
        cpu, store_cpu = tree_cpu_seconds(pid), {name: tree_cpu_seconds(p) for name, p in stores.items()}
        with RssPeak(pid) as peak:
            before_kb = peak.peak_kb
            began = time.perf_counter()
            asyncio.run(fresco_side.materialize(service.process.address, dataset))
            seconds = time.perf_counter() - began
        cpu = tree_cpu_seconds(pid) - cpu
        store_cpu = {name: tree_cpu_seconds(p) - store_cpu[name] for name, p in stores.items()}
    finally:
        service.process.stop()
    rows = dataset.entities * len(dataset.files)
    growth = (peak.peak_kb - before_kb) / 1024
    return Run("Fresco", label, rows, seconds, cpu, before_kb / 1024, growth, store_cpu or None)


def feast_run(python: Path, label: str, dataset: data.Dataset, repo: Path, online_store: str | None) -> Run:
    """Feast's repository on the same files (`online_store` replaces its Redis online store), `feast apply`,
    then FeatureStore.materialize over the data's event times, timed in process."""
    log = WORK / "logs" / f"feast-{label}.log"
    if online_store is not None:
        config = repo / "feature_store.yaml"
        lines = config.read_text().splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("online_store:"))
        end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith(" "))
        config.write_text("\n".join([*lines[:start], online_store, *lines[end:]]) + "\n")
    feast_cli(python, repo, ["apply"], log, 300)
    command = [str(python), str(RUNNER), str(repo), str(dataset.oldest_s - 1), str(dataset.newest_s + 1)]
    with log.open("a") as err:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=err, text=True, cwd=repo, timeout=900)
    answer = next((json.loads(line[len(MARK) :]) for line in done.stdout.splitlines() if line.startswith(MARK)), None)
    if done.returncode != 0 or answer is None:
        raise SetupError(f"Feast's materialisation failed (exit {done.returncode}); see {log}")
    rows = dataset.entities * len(dataset.files)
    growth = (answer["peak_rss_kb"] - answer["peak_rss_before_kb"]) / 1024
    return Run("Feast", label, rows, answer["seconds"], answer["cpu_s"], answer["peak_rss_before_kb"] / 1024, growth)


def cli_progress(dataset: data.Dataset, definitions: Path) -> tuple[bool, str]:
    """`fresco features materialize` in process on one file: whether its progress bar showed every row done."""
    view, path = next(iter(dataset.files.items()))
    command = [
        str(Path(sys.executable).with_name("fresco")), "features", "materialize",
        "--view", view, "--source", str(path), "--definitions", str(definitions),
        "--backend", "sqlite", "--sqlite-path", str(WORK / "cli.db"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "120"})
    output = done.stdout + done.stderr
    lines = [line.strip() for line in output.splitlines() if line.strip().startswith(("rows", "statistics"))]
    shown = f"{dataset.entities}/{dataset.entities}"
    ok = done.returncode == 0 and any(line.startswith("rows") and shown in line for line in lines)
    return ok, " | ".join(" ".join(line.split()) for line in lines) or output.strip()[-200:]


def table(runs: list[Run]) -> str:
    header = (
        "system",
        "store",
        "rows",
        "seconds",
        "rows/s",
        "CPU s",
        "CPU µs/row",
        "store CPU s",
        "RSS MB",
        "peak +MB",
    )
    body = [
        (
            r.system,
            r.backend,
            f"{r.rows:,}",
            f"{r.seconds:.2f}",
            f"{r.rows_per_s:,.0f}",
            "-" if r.cpu_s is None else f"{r.cpu_s:.2f}",
            "-" if r.cpu_s is None else f"{r.cpu_s / r.rows * 1e6:.1f}",
            "-" if not r.store_cpu_s else " + ".join(f"{name} {s:.1f}" for name, s in r.store_cpu_s.items()),
            "-" if r.rss_before_mb is None else f"{r.rss_before_mb:.0f}",
            "-" if r.peak_growth_mb is None else f"{r.peak_growth_mb:.1f}",
        )
        for r in runs
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *body]]
    lines.insert(1, "  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def speedup_goal(name: str, fresco: Run | None, feast: Run | None, peer: str) -> Goal:
    target = f"≥ {SPEEDUP_TARGET:g}× Feast's rows/s"
    if fresco is None or feast is None:
        missing = "Feast skipped" if feast is None else "Fresco run skipped"
        return Goal(name, "SKIP", missing, target, peer)
    ratio = fresco.rows_per_s / feast.rows_per_s
    measured = f"{ratio:.2f}× ({fresco.rows_per_s:,.0f} vs {feast.rows_per_s:,.0f} rows/s)"
    return Goal(name, verdict(ratio >= SPEEDUP_TARGET), measured, target, peer, ratio)


class Bench:
    """Servers started by a run; close() stops them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.entities: int = args.entities or (10_000 if args.quick else 100_000)
        self.redis: RedisServer | None = None
        self.cassandra: CassandraNode | None = None

    def close(self) -> None:
        for name, stop in (
            ("cassandra", self.cassandra and self.cassandra.kill),
            ("redis", self.redis and self.redis.stop),
        ):
            if stop:
                try:
                    stop()
                except Exception as err:  # noqa: BLE001 - stopping the others matters more
                    print(f"   could not stop {name}: {err}", file=sys.stderr, flush=True)

    def run(self) -> None:
        args = self.args
        print(f"Machine: {machine_load().describe()}", flush=True)
        if WORK.exists():
            shutil.rmtree(WORK)
        (WORK / "logs").mkdir(parents=True)
        feast_python = None if args.skip_feast else ensure_feast(CACHE)

        step(f"Data: bench.features' two views × 20 features, {self.entities:,} and {4 * self.entities:,} entities")
        small = dataset_of(WORK / "data-1x", self.entities)
        large = dataset_of(WORK / "data-4x", 4 * self.entities)
        definitions = WORK / "features.yaml"
        definitions.write_text(data.fresco_definitions())
        print(f"  Parquet, row groups of {ROW_GROUP_ROWS:,} rows, under {WORK.relative_to(REPO_ROOT)}", flush=True)

        runs: list[Run] = []
        sqlite = ["--definitions", str(definitions), "--backend", "sqlite"]
        step("Fresco, SQLite: a fresh service per run, Materialize both views")
        logs = WORK / "logs"
        fresco_sqlite = fresco_run("sqlite", [*sqlite, "--sqlite-path", str(WORK / "1x.db")], small, logs / "f1.log")
        runs.append(fresco_sqlite)
        step("Fresco, SQLite, memory tier off: 1× and 4× the rows (the materialisation's own memory)")
        memory_1x = fresco_run(
            "sqlite, L1 off", [*sqlite, "--sqlite-path", str(WORK / "m1.db")], small, logs / "m1.log", l1=False
        )
        memory_4x = fresco_run(
            "sqlite, L1 off, 4× rows", [*sqlite, "--sqlite-path", str(WORK / "m4.db")], large, logs / "m4.log", l1=False
        )
        runs += [memory_1x, memory_4x]

        fresco_rc: Run | None = None
        feast_redis: Run | None = None
        if not args.skip_cassandra or feast_python is not None:
            step("Servers: redis-server (Fresco db 0, Feast db 1)" + ("" if args.skip_cassandra else ", Cassandra"))
            self.redis = RedisServer(data_dir=WORK / "redis").start()
        if not args.skip_cassandra:
            self.cassandra = CassandraNode(base_dir=WORK / "cassandra", quick_jit=False)
            self.cassandra.start()
            step("Fresco, Redis + Cassandra: Materialize both views")
            backend = [
                "--definitions", str(definitions), "--backend", "redis+cassandra",
                "--redis-url", f"redis://127.0.0.1:{self.redis.port}/{FRESCO_DB}",  # type: ignore[union-attr]
                "--cassandra-port", str(self.cassandra.port), "--cassandra-keyspace", KEYSPACE,
            ]  # fmt: skip
            pids = {"redis": self.redis.pid, "cassandra": self.cassandra.pid}  # type: ignore[union-attr]
            stores = {name: pid for name, pid in pids.items() if pid is not None}
            fresco_rc = fresco_run("redis+cassandra", backend, small, WORK / "logs" / "frc.log", stores)
            runs.append(fresco_rc)

        feast_sqlite: Run | None = None
        if feast_python is not None:
            step("Feast: feast apply, then FeatureStore.materialize in process (SQLite, then Redis)")
            assert self.redis is not None
            repo = data.write_feast_repo(WORK / "feast-sqlite", small, "127.0.0.1", self.redis.port, FEAST_DB)
            online = "online_store:\n  type: sqlite\n  path: data/online.db"
            feast_sqlite = feast_run(feast_python, "sqlite", small, repo, online)
            runs.append(feast_sqlite)
            repo = data.write_feast_repo(WORK / "feast-redis", small, "127.0.0.1", self.redis.port, FEAST_DB)
            feast_redis = feast_run(feast_python, "redis", small, repo, None)
            runs.append(feast_redis)

        step("fresco features materialize (CLI, in process): its progress bar")
        progress_ok, progress_shown = cli_progress(small, definitions)
        print(f"  {progress_shown}", flush=True)

        print("\nMaterialisation, both views (rows = entities × 2 files); CPU of the service (Fresco) or of")
        print("Feast's process; peak +MB: resident memory above what the process held before loading")
        print(table(runs))

        growth_1x, growth_4x = memory_1x.peak_growth_mb or 0.0, memory_4x.peak_growth_mb or 0.0
        memory_ratio = growth_4x / growth_1x if growth_1x > 0 else float("inf")
        goals = [
            speedup_goal("materialise, SQLite", fresco_sqlite, feast_sqlite, "Feast (SQLite online store)"),
            speedup_goal("materialise, Redis + Cassandra", fresco_rc, feast_redis, "Feast (Redis online store)")
            if not args.skip_cassandra
            else Goal("materialise, Redis + Cassandra", "SKIP", "--skip-cassandra", f"≥ {SPEEDUP_TARGET:g}×"),
            Goal(
                "memory bounded by the chunk, not the file",
                verdict(memory_ratio <= MEMORY_GROWTH_TARGET),
                f"peak +{growth_4x:.1f} MB for 4× the rows vs +{growth_1x:.1f} MB ({memory_ratio:.2f}×)",
                f"≤ {MEMORY_GROWTH_TARGET:g}× with 4× the rows",
                "same service, 1× file (L1 off)",
                memory_ratio,
            ),
            Goal(
                "progress bar (fresco features materialize)",
                verdict(progress_ok),
                "rows bar reached every row" if progress_ok else f"not seen: {progress_shown[:80]}",
                "a rows bar to N/N",
            ),
        ]
        notes = [
            f"{self.entities:,} entities × 2 views; Parquet row groups of {ROW_GROUP_ROWS:,} rows; Fresco's "
            "service with its default --materialize-chunk-rows",
            "Fresco: wall time of the Materialize RPCs on a running service; Feast: FeatureStore.materialize "
            "in process after `feast apply` (neither counts its start-up)",
        ]
        record("materialize", goals, quick=args.quick, notes=notes)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(REPO_ROOT)
    signal.signal(signal.SIGTERM, _interrupt)
    bench = Bench(args)
    try:
        bench.run()
    except (SetupError, ServerError) as err:
        print(f"\nbench.materialize: setup failed: {err}", file=sys.stderr)
        return 2
    except (ServiceFailed, RuntimeError) as err:
        print(f"\nbench.materialize: failed: {fresco_side.rpc_error(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench.materialize: interrupted", file=sys.stderr)
        return 130
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
