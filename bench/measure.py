"""What every benchmark reads off the machine: a process tree's CPU seconds and memory (from /proc),
the machine's load, and the revision measured. CPU per request is the figure to compare here: other
tenants share these cores, so wall-clock throughput swings while CPU per request holds."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE = REPO_ROOT / ".cache" / "bench"
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds one process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (worker processes of a supervisor, say)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of `pid` and its live descendants (exited children are not counted: read it
    before and after a load while the tree is up)."""
    total = 0.0
    for member in descendants(pid):
        try:
            total += cpu_seconds(member)
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
    return total


@dataclass(frozen=True)
class Memory:
    """Resident and proportional set sizes in bytes (PSS splits shared pages among their sharers)."""

    rss: int
    pss: int


def memory(pid: int) -> Memory:
    """RSS and PSS of one process, from /proc/PID/smaps_rollup."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            values[key] = int(rest.split()[0]) * 1024
    return Memory(values["Rss"], values["Pss"])


def tree_memory(pid: int) -> Memory:
    """RSS and PSS summed over `pid` and its descendants (summed RSS counts shared pages once per
    process; summed PSS counts them once in all)."""
    rss = pss = 0
    for member in descendants(pid):
        try:
            figures = memory(member)
        except (OSError, KeyError):
            continue
        rss, pss = rss + figures.rss, pss + figures.pss
    return Memory(rss, pss)


@dataclass(frozen=True)
class Load:
    """The machine's load: 1-minute load average and the share of CPU time stolen by the hypervisor
    over a short sample."""

    load_1m: float
    steal: float

    def describe(self) -> str:
        return f"load average {self.load_1m:.2f} on {os.cpu_count()} cores, steal {self.steal:.0%}"


def _cpu_times() -> list[int]:
    return [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]


def machine_load(sample_s: float = 0.5) -> Load:
    before = _cpu_times()
    time.sleep(sample_s)
    after = _cpu_times()
    delta = [b - a for a, b in zip(before, after, strict=False)]
    total = sum(delta) or 1
    steal = delta[7] / total if len(delta) > 7 else 0.0
    return Load(os.getloadavg()[0], steal)


def git_revision() -> str:
    """The short commit measured, `+dirty` when the tree has changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
