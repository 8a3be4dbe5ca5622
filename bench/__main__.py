"""`make bench`: every benchmark in turn, then one summary of their goals.

    python -m bench [--quick] [--only predictor,gateway] [--skip int8]

Each benchmark runs as its own process (`python -m bench.NAME`), prints its full report and records
its goals (bench/goals.py); the summary lists every goal with its peer, the figure measured, the
target and PASS / MISS / SKIP, each benchmark's machine load, and says which benchmarks failed to
finish. The exit status is 0 when every benchmark finished, whatever its verdicts."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bench.goals import GOAL_COLUMNS, STATUSES, goal_row, load_recorded, table
from bench.measure import REPO_ROOT, git_revision, machine_load

# In the order they run: the cheapest first, so that a short run still says something.
BENCHMARKS = ("int8", "gateway", "predictor", "batching", "worker_memory", "features", "materialize")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="each benchmark's short run")
    parser.add_argument("--only", default="", help="comma-separated benchmarks to run (default: all)")
    parser.add_argument("--skip", default="", help="comma-separated benchmarks not to run")
    args = parser.parse_args(argv)
    chosen = [b for b in BENCHMARKS if (not args.only or b in args.only.split(",")) and b not in args.skip.split(",")]
    unknown = set(filter(None, (args.only + "," + args.skip).split(","))) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; expected some of {', '.join(BENCHMARKS)}")
    began = time.time()
    start_load = machine_load()
    outcomes: dict[str, str] = {}
    for name in chosen:
        print(f"\n=== bench.{name} ===", flush=True)
        started = time.monotonic()
        command = [sys.executable, "-m", f"bench.{name}", *(["--quick"] if args.quick else [])]
        code = subprocess.run(command, cwd=REPO_ROOT, check=False).returncode
        outcomes[name] = f"exit {code}" if code else f"{time.monotonic() - started:.0f} s"
    text, failed = summary(chosen, began, outcomes)
    print()
    print(f"=== summary: revision {git_revision()}, {'quick runs, ' if args.quick else ''}started at "
          f"{time.strftime('%H:%M:%S', time.localtime(began))} with {start_load.describe()} ===")  # fmt: skip
    print(text)
    return 1 if failed else 0


def summary(chosen: list[str], began: float, outcomes: dict[str, str]) -> tuple[str, list[str]]:
    """One table of the goals every chosen benchmark recorded since `began` (benchmark, goal, peer,
    measured, target, verdict), each benchmark's run time and machine load under it, and the totals;
    and the benchmarks that recorded none (they failed or did not run)."""
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    failed: list[str] = []
    counts = dict.fromkeys(STATUSES, 0)
    for name in chosen:
        found = load_recorded(name)
        outcome = outcomes.get(name, "not run")
        if found is None or float(str(found[0]["finished_epoch"])) < began:
            failed.append(name)
            notes.append(f"{name}: no goals recorded by this run ({outcome})")
            continue
        header, goals = found
        for index, goal in enumerate(goals):
            rows.append((name if index == 0 else "", *goal_row(goal)))
            counts[goal.status] += 1
        quick = "quick run, " if header.get("quick") else ""
        notes.append(
            f"{name}: {quick}{outcome}, load average {float(str(header['load_1m'])):.2f} "
            f"and steal {float(str(header['steal'])):.0%} at its end"
        )
    totals = ", ".join(f"{counts[s]} {s}" for s in STATUSES)
    if failed:
        totals += f"; did not finish: {', '.join(failed)}"
    text = table("goals of every benchmark", ("benchmark", *GOAL_COLUMNS), rows) if rows else "no goals recorded"
    return "\n".join([text, "", *notes, "", totals]), failed


if __name__ == "__main__":
    sys.exit(main())
