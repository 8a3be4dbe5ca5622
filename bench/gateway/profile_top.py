"""Top entries of a py-spy raw (collapsed) profile: `python -m bench.gateway.profile_top FILE [N]` prints the
functions with the most samples on the stack (inclusive) and at the top of it (self), as shares of all samples."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

# Frames every sample of the event loop's thread passes through: left out of the inclusive list.
_ROOTS = ("<module> ", "_run_code ", "_run_module_as_main ", "run (__init__.py)", "run (server.py)")


def _name(frame: str) -> str:
    # "function (path/to/file.py:line)" -> "function (file.py)"
    function, _, where = frame.partition(" (")
    file = where.rsplit("/", 1)[-1].split(":", 1)[0].rstrip(")")
    return f"{function} ({file})" if file else function


def top(path: Path, count: int = 25) -> str:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        n = int(samples)
        total += n
        frames = [_name(f) for f in stack.split(";")[1:]]  # the first entry names the thread
        for frame in set(frames):
            inclusive[frame] += n
        if frames:
            own[frames[-1]] += n
    lines = [f"{total} samples", "inclusive (without the entry frames):"]
    shown = [(frame, n) for frame, n in inclusive.most_common() if not frame.startswith(_ROOTS)][:count]
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in shown]
    lines.append("self:")
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in own.most_common(count)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(top(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 25))
