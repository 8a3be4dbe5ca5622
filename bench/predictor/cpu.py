"""Issue 11's figures: each server's own CPU time per request under perf_analyzer (read from /proc
before and after each run, over the requests it answered in that run), Fresco against the floor and
the hand-rolled server with one worker and with N, and the goals judged on them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bench.goals import Goal, verdict
from bench.measure import tree_cpu_seconds

if TYPE_CHECKING:
    from bench.predictor.__main__ import ServerRun
    from bench.predictor.load import LoadResult

MAX_FLOOR_CPU_RATIO = 1.25
WELL_UNDER_HANDROLLED = 0.8  # "well under" the hand-rolled server at c16
MIN_FLOOR_THROUGHPUT = 0.8
MIN_MLSERVER_RATIO = 3.0


@dataclass
class CpuMeter:
    """Reads a server's process tree CPU seconds and the requests it has answered so far."""

    pid: Callable[[], int | None]
    count: Callable[[], int]

    def read(self) -> tuple[float, int] | None:
        pid = self.pid()
        if pid is None:
            return None
        return tree_cpu_seconds(pid), self.count()


def charge(result: LoadResult, before: tuple[float, int] | None, after: tuple[float, int] | None) -> None:
    """Store the CPU per request of one run in `result`."""
    if before is None or after is None:
        return
    requests = after[1] - before[1]
    if requests > 0:
        result.requests = requests
        result.cpu_us_per_request = (after[0] - before[0]) / requests * 1e6


def _cpu(server: ServerRun | None, concurrency: int) -> float | None:
    run = server.at(concurrency) if server else None
    return run.cpu_us_per_request if run and run.cpu_us_per_request else None


def render_cpu(servers: Sequence[ServerRun], concurrencies: Sequence[int]) -> str:
    """The CPU per request table: one row per server, one column per concurrency, and Fresco's ratios."""
    lines = ["Server CPU per request (µs, from /proc; lower is better)"]
    header = f"  {'server':<30}" + "".join(f"{'c' + str(c):>10}" for c in concurrencies)
    lines += [header, "  " + "-" * (len(header) - 2)]
    for server in servers:
        if not any(r.cpu_us_per_request for r in server.results):
            continue
        cells = "".join(
            f"{cpu:>10.0f}" if (cpu := _cpu(server, c)) is not None else f"{'—':>10}" for c in concurrencies
        )
        lines.append(f"  {server.label:<30}{cells}")
    for workers in sorted({s.workers for s in servers if s.key.startswith("fresco")}):
        fresco = _by(servers, "fresco", workers)
        for peer in ("floor", "handrolled"):
            other = _by(servers, peer, workers)
            cells = ""
            for c in concurrencies:
                mine, theirs = _cpu(fresco, c), _cpu(other, c)
                cells += f"{mine / theirs:>9.2f}×" if mine and theirs else f"{'—':>10}"
            lines.append(f"  {f'fresco/{peer} ({workers}w)':<30}{cells}")
    return "\n".join(lines)


def _by(servers: Sequence[ServerRun], kind: str, workers: int) -> ServerRun | None:
    return next((s for s in servers if s.key.startswith(kind) and s.workers == workers), None)


def goals(servers: Sequence[ServerRun], concurrencies: Sequence[int], many: int) -> list[Goal]:
    """The goals of "Predictor at the floor", judged on this run."""
    found: list[Goal] = []
    for workers in (1, many):
        fresco, floor = _by(servers, "fresco", workers), _by(servers, "floor", workers)
        mine, theirs = _cpu(fresco, 16), _cpu(floor, 16)
        name = f"CPU/request at c16, {workers} worker{'s' if workers > 1 else ''}"
        if mine is None or theirs is None:
            found.append(Goal(name, "SKIP", "c16 not measured for both", f"≤ {MAX_FLOOR_CPU_RATIO}× floor", "floor"))
        else:
            ratio = mine / theirs
            found.append(
                Goal(
                    name, verdict(ratio <= MAX_FLOOR_CPU_RATIO), f"{mine:.0f} vs {theirs:.0f} µs = {ratio:.2f}×",
                    f"≤ {MAX_FLOOR_CPU_RATIO}×", "floor", ratio,
                )
            )  # fmt: skip
        if workers == many == 1:
            break
    worst: tuple[float, str] | None = None
    for workers in sorted({1, many}):
        fresco, hand = _by(servers, "fresco", workers), _by(servers, "handrolled", workers)
        for c in concurrencies:
            mine, theirs = _cpu(fresco, c), _cpu(hand, c)
            if mine and theirs and (worst is None or mine / theirs > worst[0]):
                worst = (mine / theirs, f"c{c} {workers}w")
    name = "CPU/request never above hand-rolled"
    if worst is None:
        found.append(Goal(name, "SKIP", "not measured", "≤ 1.00× at every c", "hand-rolled"))
    else:
        found.append(
            Goal(name, verdict(worst[0] <= 1.0), f"worst {worst[0]:.2f}× ({worst[1]})", "≤ 1.00× at every c",
                 "hand-rolled", worst[0])
        )  # fmt: skip
    for workers in sorted({1, many}):
        fresco, hand = _by(servers, "fresco", workers), _by(servers, "handrolled", workers)
        mine, theirs = _cpu(fresco, 16), _cpu(hand, 16)
        name = f"CPU/request at c16 well under hand-rolled, {workers}w"
        target = f"≤ {WELL_UNDER_HANDROLLED}×"
        if mine is None or theirs is None:
            found.append(Goal(name, "SKIP", "c16 not measured for both", target, "hand-rolled"))
        else:
            ratio = mine / theirs
            found.append(
                Goal(name, verdict(ratio <= WELL_UNDER_HANDROLLED), f"{mine:.0f} vs {theirs:.0f} µs = {ratio:.2f}×",
                     target, "hand-rolled", ratio)
            )  # fmt: skip
    for workers in sorted({1, many}):
        fresco, floor = _by(servers, "fresco", workers), _by(servers, "floor", workers)
        shares = [
            (ours.infer_per_s / base.infer_per_s, c)
            for c in concurrencies
            if fresco and floor and (ours := fresco.at(c)) and (base := floor.at(c)) and base.infer_per_s
        ]
        name = f"throughput ≥ 80% of floor at c{min(concurrencies)}–c{max(concurrencies)}, {workers}w"
        if not shares:
            found.append(Goal(name, "SKIP", "not measured", "≥ 80% at every c", "floor"))
        else:
            low, at = min(shares)
            found.append(
                Goal(name, verdict(low >= MIN_FLOOR_THROUGHPUT), f"lowest {low:.0%} (c{at})", "≥ 80% at every c",
                     "floor", low)
            )  # fmt: skip
    fresco = _by(servers, "fresco", many)
    f16 = fresco.at(16) if fresco else None
    best = max(
        (r for s in servers if s.key.startswith("mlserver") and (r := s.at(16)) is not None),
        key=lambda r: r.infer_per_s,
        default=None,
    )
    name = f"throughput at c16 vs MLServer's best, {many}w"
    if f16 is None or best is None:
        found.append(Goal(name, "SKIP", "c16 not measured for both", f"≥ {MIN_MLSERVER_RATIO:g}×", "MLServer"))
    else:
        ratio = f16.infer_per_s / best.infer_per_s
        found.append(
            Goal(name, verdict(ratio >= MIN_MLSERVER_RATIO),
                 f"{f16.infer_per_s:,.0f} vs {best.infer_per_s:,.0f} infer/s = {ratio:.2f}×",
                 f"≥ {MIN_MLSERVER_RATIO:g}×", "MLServer", ratio)
        )  # fmt: skip
    return found
