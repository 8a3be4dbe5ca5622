"""`exit_with_process`: a process watching another (not its parent) gets SIGTERM when that one exits."""

from __future__ import annotations

import signal
import subprocess
import sys

WATCHER = """
import sys, time
from chassis.lifetime import exit_with_process
print(exit_with_process(int(sys.argv[1])), flush=True)
time.sleep(60)
"""


def test_the_watcher_is_terminated_when_the_watched_process_exits() -> None:
    watched = subprocess.Popen(["sleep", "60"])
    watcher = subprocess.Popen([sys.executable, "-c", WATCHER, str(watched.pid)], stdout=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout is not None
        assert watcher.stdout.readline().strip() == "True"
        assert watcher.poll() is None  # the watched process still runs
        watched.kill()
        watched.wait()
        assert watcher.wait(30) == -signal.SIGTERM
    finally:
        for process in (watched, watcher):
            process.kill()
            process.wait()
        watcher.stdout.close()  # type: ignore[union-attr]


def test_a_process_already_gone_terminates_the_watcher_at_once() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid names no process
    watcher = subprocess.Popen([sys.executable, "-c", WATCHER, str(gone.pid)], stdout=subprocess.PIPE, text=True)
    try:
        assert watcher.wait(30) == -signal.SIGTERM
    finally:
        watcher.kill()
        watcher.wait()
        watcher.stdout.close()  # type: ignore[union-attr]
