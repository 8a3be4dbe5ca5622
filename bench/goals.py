"""Goals a benchmark judges, in one form for every benchmark: each prints its own table and records it
under `.cache/bench/goals/`, and `python -m bench` (`make bench`) prints them all as one summary."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.measure import CACHE, git_revision, machine_load

GOALS_DIR = CACHE / "goals"
STATUSES = ("PASS", "MISS", "SKIP")


@dataclass(frozen=True)
class Goal:
    """One goal of a benchmark and this run's verdict on it.

    `measured` and `target` are printed as they are (say "1.12× floor CPU/request", "≤ 1.25×");
    `peer` names what the ratio is against ("floor", "MLServer", "Feast", "raw redis-py", "parent");
    `ratio` is the figure judged, when the goal is a ratio. SKIP says why in `measured`."""

    name: str
    status: str
    measured: str
    target: str
    peer: str = ""
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status: expected one of {STATUSES}, got {self.status!r}")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table under a title, columns padded to their widest cell."""
    lines = [header, *rows]
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = [title]
    for index, row in enumerate(lines):
        out.append("  " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if index == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(out)


GOAL_COLUMNS = ("goal", "peer", "measured", "target", "")


def goal_row(goal: Goal) -> tuple[str, str, str, str, str]:
    return goal.name, goal.peer, goal.measured, goal.target, goal.status


def render(title: str, goals: Sequence[Goal]) -> str:
    """A benchmark's goals as a table, one per line."""
    return table(title, GOAL_COLUMNS, [goal_row(g) for g in goals])


def record(benchmark: str, goals: Sequence[Goal], *, quick: bool, notes: Sequence[str] = ()) -> Path:
    """Print the goals table and write it to `.cache/bench/goals/<benchmark>.json` for the summary."""
    load = machine_load()
    print()
    print(render(f"{benchmark}: goals ({'quick run, ' if quick else ''}{load.describe()})", goals))
    for note in notes:
        print(f"  note: {note}")
    GOALS_DIR.mkdir(parents=True, exist_ok=True)
    path = GOALS_DIR / f"{benchmark}.json"
    path.write_text(
        json.dumps(
            {
                "benchmark": benchmark,
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                "finished_epoch": time.time(),
                "revision": git_revision(),
                "quick": quick,
                "load_1m": load.load_1m,
                "steal": load.steal,
                "notes": list(notes),
                "goals": [asdict(g) for g in goals],
            },
            indent=2,
        )
    )
    return path


def load_recorded(benchmark: str) -> tuple[dict[str, object], list[Goal]] | None:
    """A benchmark's last recorded run (its header and goals), or None."""
    path = GOALS_DIR / f"{benchmark}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    goals = [Goal(**g) for g in data.pop("goals")]
    return data, goals
