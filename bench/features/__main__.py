"""`python -m bench.features`: Fresco's feature service against Feast 0.67 on the same data in the same Redis,
on this machine: 100k entities, two views of 20 features, read 1 and 100 entities × 40 features at a time,
with Fresco's memory tier warm and off, and entities never written. Prints a table, the ratios and the
targets, and writes every raw figure to `.cache/bench/features-results.json`. See README.md beside this file."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import redis
import uvloop
from grpc import aio

from bench.features import data, fresco_side, report
from bench.features.feast_peer import FeastSession, apply_and_materialize, ensure_feast
from bench.features.redis_peer import RawRedisPeer
from bench.features.report import Case, CaseResult, Measured, Target
from bench.goals import record
from bench.predictor.peers import SetupError
from fresco.servers import CassandraNode, RedisServer, ServerError
from fresco.suite import ServiceFailed

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE = REPO_ROOT / ".cache" / "bench"
WORK = CACHE / "features"
RESULTS_FILE = CACHE / "features-results.json"
FRESCO_DB, FEAST_DB = 0, 1
KEYSPACE = "fresco_bench"
WARM_POOL_BATCHES = 10
"""The warm cases cycle over this many distinct batches: all in Fresco's memory tier after the warm-up."""
QUIET_CPU = 0.1
"""Cassandra counts as idle (its flushes and compactions after the load done) below this many cores busy."""


@dataclass
class Results:
    """Everything one run measured."""

    meta: dict[str, Any]
    cases: list[CaseResult] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.features", description=(__doc__ or "").split("\n\n")[0].replace("\n", " ")
    )
    parser.add_argument("--quick", action="store_true", help="10k entities and fewer calls: a smoke run")
    parser.add_argument("--entities", type=int, default=None, help="entities loaded (default 100000; 10000 --quick)")
    parser.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="timed calls per 100-entity case; 1-entity cases make twice as many (default 1000; 150 --quick)",
    )
    parser.add_argument("--skip-feast", action="store_true", help="neither install nor run Feast")
    args = parser.parse_args(argv)
    if args.entities is not None and args.entities < 1000:
        parser.error("--entities must be at least 1000")
    if args.iterations is not None and args.iterations < 10:
        parser.error("--iterations must be at least 10")
    return args


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def build_cases(iterations: int) -> list[Case]:
    return [
        Case("1-warm", "1 entity, L1 warm", 1, "warm", 2 * iterations),
        Case("1-cold", "1 entity, L1 cold (Redis)", 1, "cold", 2 * iterations),
        Case("100-warm", "100 entities, L1 warm", 100, "warm", iterations),
        Case("100-cold", "100 entities, L1 cold (Redis)", 100, "cold", iterations),
        Case("100-unknown", "100 unknown entities", 100, "unknown", iterations),
    ]


class Keys:
    """The entity ids every case reads, the same for both systems. Cold cases take ids from one shuffled
    pass over all entities (a new pass when it runs out), so no key is read twice within a pass; unknown
    ids are never written."""

    def __init__(self, entities: int, seed: int = 11) -> None:
        self.entities = entities
        self.rng = np.random.default_rng(seed)
        self._fresh: list[int] = []
        self._unknown = data.UNKNOWN_BASE

    def _take(self, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            if not self._fresh:
                self._fresh = self.rng.permutation(self.entities).tolist()
            need = count - len(out)
            out += self._fresh[:need]
            del self._fresh[:need]
        return out

    def plan(self, case: Case, warmup: int, rounds: int) -> list[tuple[list[list[int]], list[list[int]]]]:
        """Per round, the warm-up batches and the timed batches of a case (case.iterations timed in all).
        Warm cases cycle over a pool of WARM_POOL_BATCHES batches, every round warming up on the whole pool
        (so it is in Fresco's memory tier, well within its TTL); cold and unknown ones warm up on other
        keys of the same kind."""
        n = case.entities
        sizes = [len(part) for part in np.array_split(np.arange(case.iterations), rounds)]
        if case.kind == "warm":
            pool = self._take(n * WARM_POOL_BATCHES)
            cycle = [pool[i * n : (i + 1) * n] for i in range(WARM_POOL_BATCHES)]
            first = -(-max(warmup, WARM_POOL_BATCHES) // WARM_POOL_BATCHES)
            return [
                (cycle * (first if r == 0 else 1), [cycle[i % WARM_POOL_BATCHES] for i in range(size)])
                for r, size in enumerate(sizes)
            ]
        per_round = [warmup if r == 0 else max(3, warmup // rounds) for r in range(rounds)]
        total = sum(per_round) + case.iterations
        if case.kind == "cold":
            ids = self._take(n * total)
        else:
            ids = list(range(self._unknown, self._unknown + n * total))
            self._unknown += len(ids)
        batches = [ids[i * n : (i + 1) * n] for i in range(total)]
        out = []
        for count, size in zip(per_round, sizes, strict=True):
            out.append((batches[:count], batches[count : count + size]))
            del batches[: count + size]
        return out


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("grpcio", "protobuf", "redis", "cassandra-driver", "msgpack", "numpy", "pyarrow", "uvloop"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "missing"
    try:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=False).stdout
        found["redis_server"] = next((p[2:] for p in out.split() if p.startswith("v=")), out.strip())
    except OSError:
        found["redis_server"] = "missing"
    return found


def git_revision() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_idle(pid: int | None, limit_s: float) -> float:
    """Wait (at most limit_s) until the process uses under QUIET_CPU cores over a second; seconds waited."""
    began = time.monotonic()
    if pid is None:
        return 0.0
    try:
        while time.monotonic() - began < limit_s:
            before = cpu_seconds(pid)
            time.sleep(1.0)
            if cpu_seconds(pid) - before < QUIET_CPU:
                break
    except (OSError, IndexError, ValueError):
        pass
    return time.monotonic() - began


def db_info(port: int) -> dict[str, Any]:
    """Keys in each database and memory used by the benchmark's Redis."""
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        keyspace = client.info("keyspace")
        memory = client.info("memory")
    finally:
        client.close()
    return {
        "keys": {name: int(value["keys"]) for name, value in keyspace.items()},
        "used_memory_mb": round(int(memory["used_memory"]) / 1e6, 1),
    }


def compare(name: str, got: dict[str, list[Any]], dataset: data.Dataset, known: list[int], unknown: int) -> str:
    """Check one system's answers for known entities (exact values) and unknown ones (null)."""
    wrong = []
    checked = 0
    for ref in data.REFS:
        values = got.get(ref)
        if values is None or len(values) != len(known) + unknown:
            return f"DIFFER: no column {ref} of {len(known) + unknown} values from {name}"
        for user_id, value in zip(known, values, strict=False):
            checked += 1
            if value != dataset.expected(ref, user_id):
                wrong.append(f"{ref}[{user_id}]={value!r}")
        for value in values[len(known) :]:
            checked += 1
            if value is not None:
                wrong.append(f"{ref}[unknown]={value!r}")
    if wrong:
        return f"DIFFER on {len(wrong)} of {checked} values, e.g. {', '.join(wrong[:3])}"
    return f"match ({checked} values: {len(known)} known entities exact, {unknown} unknown null)"


class Bench:
    """The servers and clients of one run; everything started is stopped by close()."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.entities: int = args.entities or (10_000 if self.quick else 100_000)
        self.iterations: int = args.iterations or (150 if self.quick else 1000)
        # The client runs on uvloop, as Fresco's own services (the gateway calling the feature service) do.
        self.loop = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        self.redis: RedisServer | None = None
        self.cassandra: CassandraNode | None = None
        self.services: list[fresco_side.Service] = []
        self.feast: FeastSession | None = None
        self.raw: RawRedisPeer | None = None
        self.notes: list[str] = []
        self.rounds: int = 2 if self.quick else 4
        self.client = fresco_side.Client()

    def close(self) -> None:
        print("-- stopping everything", flush=True)
        steps: list[tuple[str, Callable[[], object]]] = [("grpc channels", lambda: self.loop.run(self.client.close()))]
        if self.feast is not None:
            steps.append(("feast runner", self.feast.stop))
        if self.raw is not None:
            steps.append(("raw redis-py client", self.raw.close))
        for service in reversed(self.services):
            steps.append((f"feature service ({service.label})", service.process.stop))
        if self.cassandra is not None:
            steps.append(("cassandra", self.cassandra.kill))  # its data is thrown away: no drain needed
        if self.redis is not None:
            steps.append(("redis", self.redis.stop))
        for name, stop in steps:
            try:
                stop()
            except Exception as err:  # noqa: BLE001 - stopping the others matters more
                print(f"   could not stop {name}: {err}", file=sys.stderr, flush=True)
        self.loop.close()

    def run(self) -> Results:
        load_average = os.getloadavg()[0]
        results = Results(
            meta={
                "started": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": {
                    "cores": os.cpu_count(),
                    "platform": platform.platform(),
                    "python": platform.python_version(),
                },
                "versions": versions(),
                "git": git_revision(),
                "load_average_at_start": load_average,
                "options": {
                    "quick": self.quick,
                    "entities": self.entities,
                    "iterations": self.iterations,
                    "skip_feast": self.args.skip_feast,
                    "rounds": self.rounds,
                },
                "setup": {},
                "notes": self.notes,
            }
        )
        meta, setup = results.meta, results.meta["setup"]
        print(f"Machine load average: {load_average:.2f}", flush=True)
        if load_average > report.BUSY_LOAD_AVERAGE:
            print(f"WARNING: load average {load_average:.2f} > 1: other work is running; figures will be noisy")
        if WORK.exists():
            shutil.rmtree(WORK)
        (WORK / "logs").mkdir(parents=True)

        feast_python: Path | None = None
        if not self.args.skip_feast:
            step("Peer (installed once under .cache/bench/)")
            feast_python = ensure_feast(CACHE)
            print(f"  Feast: {feast_python}", flush=True)

        step(f"Data: {self.entities:,} entities, 2 views × 20 features, one Parquet file per view")
        began = time.perf_counter()
        dataset = data.generate(WORK / "data", self.entities)
        definitions = WORK / "features.yaml"
        definitions.write_text(data.fresco_definitions())
        print(f"  written in {time.perf_counter() - began:.1f}s under {(WORK / 'data').relative_to(REPO_ROOT)}")

        step("Servers: one redis-server, one Cassandra node (C2 JIT)")
        self.redis = RedisServer(data_dir=WORK / "redis").start()
        print(f"  redis-server {meta['versions']['redis_server']} on port {self.redis.port}", flush=True)
        began = time.perf_counter()
        self.cassandra = CassandraNode(base_dir=WORK / "cassandra", quick_jit=False)
        self.cassandra.start()
        meta["versions"]["cassandra"] = self.cassandra.release_version
        setup["cassandra_start_s"] = time.perf_counter() - began
        print(
            f"  Cassandra {self.cassandra.release_version} on port {self.cassandra.port} "
            f"in {setup['cassandra_start_s']:.1f}s",
            flush=True,
        )

        step("Fresco: feature service (redis+cassandra), Materialize both views")
        backend = [
            "--definitions", str(definitions),
            "--backend", "redis+cassandra",
            "--redis-url", f"redis://127.0.0.1:{self.redis.port}/{FRESCO_DB}",
            "--cassandra-port", str(self.cassandra.port),
            "--cassandra-keyspace", KEYSPACE,
            "--materialize-chunk-rows", str(fresco_side.CHUNK_ROWS),
        ]  # fmt: skip
        # Materialize reads only files under the directories the service is given.
        source_dirs = ["--materialize-source-dirs", str((WORK / "data").resolve())]
        loader = self._start_service("loader", backend, source_dirs, "fresco-loader.log")
        began = time.perf_counter()
        setup["fresco_materialize"] = self.loop.run(fresco_side.materialize(loader.process.address, dataset))
        setup["fresco_materialize_s"] = time.perf_counter() - began
        # The measured services start after the load, each with an empty memory tier and bloom filters built
        # from Cassandra's keys: warm-ups fill the first, and nothing the load put in memory expires mid-case.
        loader.process.stop()
        self.services.remove(loader)
        warm = self._start_service("L1 on", backend, [], "fresco-l1-on.log")
        cold = self._start_service("L1 off", backend, ["--memory-max-entries", "0"], "fresco-l1-off.log")
        setup["fresco_service_start_s"] = {"L1 on": warm.startup_s, "L1 off": cold.startup_s}

        if feast_python is not None:
            step("Feast: repository, feast apply, feast materialize (same Parquet files, same Redis, db 1)")
            repo = data.write_feast_repo(WORK / "feast-repo", dataset, "127.0.0.1", self.redis.port, FEAST_DB)
            log = WORK / "logs" / "feast-cli.log"
            applied, materialized = apply_and_materialize(
                feast_python, repo, dataset.oldest_s - 60, time.time() + 60, log
            )
            setup["feast_apply_s"], setup["feast_materialize_s"] = applied, materialized
            print(f"  apply {applied:.1f}s, materialize {materialized:.1f}s (log {log.relative_to(REPO_ROOT)})")
            self.feast = FeastSession(feast_python, repo, WORK / "logs" / "feast-runner.log").start()
            meta["versions"]["feast"] = self.feast.version

        setup["redis"] = db_info(self.redis.port)
        keys = setup["redis"]["keys"]
        print(
            f"  Redis holds {keys.get(f'db{FRESCO_DB}', 0):,} Fresco keys (db {FRESCO_DB}), "
            f"{keys.get(f'db{FEAST_DB}', 0):,} Feast keys (db {FEAST_DB}); {setup['redis']['used_memory_mb']} MB",
            flush=True,
        )
        if keys.get(f"db{FRESCO_DB}", 0) != len(data.VIEWS) * self.entities:
            self.notes.append(
                f"Redis db {FRESCO_DB} holds {keys.get(f'db{FRESCO_DB}', 0)} keys, expected "
                f"{len(data.VIEWS) * self.entities} (one per view and entity): some cold reads may reach Cassandra."
            )

        step("Answers: both systems against the Parquet data")
        known = [0, 1, self.entities // 2, self.entities - 1]
        ids = [*known, data.UNKNOWN_BASE - 1]
        answers = {
            "fresco": compare(
                "fresco", self.loop.run(fresco_side.sample(cold.process.address, data.REFS, ids)), dataset, known, 1
            )
        }
        if self.feast is not None:
            got = self.feast.call({"op": "sample", "refs": data.REFS, "ids": ids})["values"]
            answers["feast"] = compare("feast", got, dataset, known, 1)
        for system, verdict in answers.items():
            print(f"  {system}: {verdict}", flush=True)
            if not verdict.startswith("match"):
                self.notes.append(f"{system}'s answers differ from the data: {verdict}")
        meta["answers"] = answers
        if self.feast is not None:
            heap = self.feast.call({"op": "gc"})
            meta["feast_heap"] = {"objects": heap["objects"], "full_collection_ms": heap["full_collection_ms"]}
            self.notes.append(
                f"Feast's process holds {heap['objects']:,} GC-tracked objects once its store is open; one full "
                f"collection of them took {heap['full_collection_ms']:.0f} ms here."
            )

        step("Redis filled: every entity read once through the L1-off service (untimed)")
        # Materialize leaves Redis holding floors for keys it held nothing for (it cannot tell a new write is the
        # latest), so the first read of each key goes to Cassandra and fills Redis: the "from Redis" cases need
        # those reads done first.
        began = time.perf_counter()
        every = list(range(self.entities))
        batches = [every[i : i + 100] for i in range(0, len(every), 100)]
        self.loop.run(self.client.run(cold.process.address, data.REFS, batches, []))
        time.sleep(1.0)  # the service fills Redis in the background after answering
        self.raw = RawRedisPeer(self.redis.port, FRESCO_DB)
        _, not_records = self.raw.read(self.raw.keys(every[:1000]))
        setup["redis_fill_s"] = time.perf_counter() - began
        print(
            f"  {self.entities:,} entities in {setup['redis_fill_s']:.1f}s; of the first 1,000 entities' "
            f"{1000 * len(data.VIEWS):,} keys, {not_records} hold no record",
            flush=True,
        )

        waited = wait_idle(self.cassandra.pid, 20.0 if self.quick else 60.0)
        meta["waited_for_cassandra_idle_s"] = round(waited, 1)
        meta["load_average_before_measuring"] = os.getloadavg()[0]
        step(
            f"Reads: concurrency 1, {self.iterations} calls per 100-entity case, {2 * self.iterations} per 1-entity "
            f"case (waited {waited:.0f}s for Cassandra to go idle; load average {os.getloadavg()[0]:.2f})"
        )
        keyring = Keys(self.entities)
        for index, case in enumerate(build_cases(self.iterations)):
            service = cold if case.kind == "cold" else warm
            plan = keyring.plan(case, max(10, case.iterations // 10), self.rounds)
            fresco, feast, raw = fresco_side.Timed(), fresco_side.Timed(), fresco_side.Timed()
            systems = ["fresco", "feast", "redis-py"] if case.kind == "cold" else ["fresco", "feast"]
            for number, (warmup, batches) in enumerate(plan):
                # Rotate who goes first, round after round, so that none always follows another and whatever
                # else the machine does weighs on all alike.
                shift = (index + number) % len(systems)
                for system in systems[shift:] + systems[:shift]:
                    if system == "fresco":
                        self._fresco_round(fresco, service, warmup, batches)
                    elif system == "feast":
                        self._feast_round(feast, warmup, batches)
                    else:
                        self._raw_round(raw, warmup, batches)
            results.cases.append(
                CaseResult(
                    case,
                    self._measured("fresco", case, fresco),
                    self._measured("feast", case, feast),
                    self._measured("redis-py", case, raw) if case.kind == "cold" else None,
                )
            )
        results.targets = report.targets(results.cases)
        self.notes.append(
            "Full (generation-2) garbage collections during the timed calls, Feast's process / Fresco's client: "
            + ", ".join(
                f"{r.case.key} {_gen2(r.feast)}/{_gen2(r.fresco)}" for r in results.cases if r.feast.ok or r.fresco.ok
            )
            + "."
        )
        return results

    def _start_service(self, label: str, backend: list[str], flags: list[str], log: str) -> fresco_side.Service:
        print(f"-- feature service, {label}: {' '.join(flags) or 'default memory tier'}", flush=True)
        service = fresco_side.start_service(label, backend, flags, WORK / "logs" / log)
        self.services.append(service)
        print(f"   ready in {service.startup_s:.1f}s on {service.process.address}", flush=True)
        return service

    def _fresco_round(
        self, into: fresco_side.Timed, service: fresco_side.Service, warmup: list[list[int]], batches: list[list[int]]
    ) -> None:
        if into.error:
            return
        try:
            into.add(self.loop.run(self.client.run(service.process.address, data.REFS, warmup, batches)))
        except Exception as err:  # noqa: BLE001 - one failed case must not lose the others
            into.error = fresco_side.rpc_error(err)
        into.detail["service"] = service.label

    def _feast_round(self, into: fresco_side.Timed, warmup: list[list[int]], batches: list[list[int]]) -> None:
        if self.feast is None:
            into.error = "skipped (--skip-feast)"
            return
        if into.error:
            return
        try:
            answer = self.feast.call({"op": "run", "refs": data.REFS, "warmup": warmup, "batches": batches})
        except RuntimeError as err:
            into.error = str(err)
            return
        part = fresco_side.Timed(
            answer["latencies_ms"], answer["seconds"], {"redis": len(batches)}, warmup_calls=len(warmup)
        )
        part.gc_collections = answer["gc_collections"]
        part.detail["check"] = answer["check"]
        into.add(part)

    def _raw_round(self, into: fresco_side.Timed, warmup: list[list[int]], batches: list[list[int]]) -> None:
        if into.error or self.raw is None:
            return
        try:
            part = self.raw.run(warmup, batches)
        except redis.RedisError as err:
            into.error = f"{type(err).__name__}: {err}"
            return
        if part.detail["values_not_records"]:
            self.notes.append(
                f"raw redis-py: {part.detail['values_not_records']} values read were not records (absent or floors)."
            )
        into.add(part)

    def _measured(self, system: str, case: Case, timed: fresco_side.Timed) -> Measured:
        """A system's rounds of a case, summarised and printed."""
        if timed.error:
            print(f"   {case.label:<32} {system:<7} FAILED: {timed.error.splitlines()[-1]}", flush=True)
            return Measured(system, error=timed.error)
        measured = report.summarize(system, case.entities, timed.latencies_ms, timed.seconds)
        measured.served_by = max(timed.served_tiers, key=timed.served_tiers.__getitem__, default="")
        if len(timed.served_tiers) > 1:
            measured.served_by += "*"
            self.notes.append(f"{case.label}: {system}'s calls by served_tiers: {timed.served_tiers}.")
        if timed.degraded:
            self.notes.append(f"{case.label}: {timed.degraded} of {system}'s answers were degraded.")
        measured.detail = dataclasses.asdict(timed)
        del measured.detail["latencies_ms"]
        _print_line(case, measured)
        return measured


def _gen2(measured: Measured) -> str:
    counts = measured.detail.get("gc_collections") or []
    return str(counts[2]) if len(counts) > 2 else "—"


def _print_line(case: Case, measured: Measured) -> None:
    print(
        f"   {case.label:<32} {measured.system:<7} p50 {measured.p50_ms:7.2f} ms  p99 {measured.p99_ms:7.2f} ms  "
        f"{measured.rows_per_s:9,.0f} rows/s  ({measured.served_by}, {measured.seconds:.1f}s)",
        flush=True,
    )


def to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (REPO_ROOT / "feature_service" / "__main__.py").exists():
        print(f"bench.features: expected the Fresco repository at {REPO_ROOT}", file=sys.stderr)
        return 2
    os.chdir(REPO_ROOT)
    # `kill` stops the run as Ctrl-C does: through the finally that stops every server.
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.perf_counter()
    bench = Bench(args)
    try:
        results = bench.run()
    except SetupError as err:
        print(f"\nbench.features: setup failed: {err}", file=sys.stderr)
        return 2
    except ServerError as err:
        print(f"\nbench.features: a server did not start: {err}", file=sys.stderr)
        return 2
    except (ServiceFailed, aio.AioRpcError, RuntimeError) as err:
        print(f"\nbench.features: failed: {fresco_side.rpc_error(err)}", file=sys.stderr)
        print(f"(logs under {(WORK / 'logs').relative_to(REPO_ROOT)}/)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench.features: interrupted", file=sys.stderr)
        return 130
    finally:
        bench.close()
    results.meta["seconds"] = round(time.perf_counter() - started, 1)
    text = report.render(results.cases, results.targets, results.meta)
    print("\n" + text, flush=True)
    record(
        "features",
        report.goals(results.cases, fresco_side.serialised_once()),
        quick=args.quick,
        notes=report.goal_notes(results.cases),
    )
    payload = to_jsonable(results)
    payload["report"] = text
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(payload, indent=2))
    print(
        f"\nRaw results: {RESULTS_FILE.relative_to(REPO_ROOT)}  (logs under {(WORK / 'logs').relative_to(REPO_ROOT)}/)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
