"""Feast's materialisation timed in process, run with the Python of Feast's own virtualenv:
`python feast_materialize.py REPO_DIR START_S END_S`. It opens the repository's FeatureStore, then times
`FeatureStore.materialize(start, end)` alone (not Feast's imports nor its CLI's start), and prints one line
starting with `@@ ` holding the wall seconds, the process's CPU seconds and its peak RSS.

It imports nothing from the Fresco repository: only the standard library and Feast."""

from __future__ import annotations

import json
import resource
import sys
import time
from datetime import UTC, datetime


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: feast_materialize.py REPO_DIR START_S END_S", file=sys.stderr)
        return 2
    import feast  # type: ignore[import-not-found]  # only in Feast's virtualenv

    store = feast.FeatureStore(repo_path=argv[0])
    store.refresh_registry()
    start, end = (datetime.fromtimestamp(float(v), UTC) for v in argv[1:])
    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began, cpu = time.perf_counter(), time.process_time()
    store.materialize(start_date=start, end_date=end)
    answer = {
        "seconds": time.perf_counter() - began,
        "cpu_s": time.process_time() - cpu,
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "peak_rss_before_kb": rss_before_kb,
        "version": feast.__version__,
    }
    sys.stdout.write("@@ " + json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
