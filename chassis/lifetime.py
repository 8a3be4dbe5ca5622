"""Tying a process's life to another's, so a supervisor killed outright leaves no orphans."""

from __future__ import annotations

import os
import select
import signal
import threading


def exit_with_process(pid: int) -> bool:
    """Send this process SIGTERM when process `pid` exits (any process, not only the parent); True if watched.

    A daemon thread waits on a pidfd of `pid` (Linux 5.3 and later; elsewhere nothing is watched and
    False comes back). A process already gone is caught too: this process then signals itself at once.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        os.kill(os.getpid(), signal.SIGTERM)
        return True
    except (AttributeError, OSError):
        return False

    def watch() -> None:
        select.select([pidfd], [], [])  # readable once `pid` has exited
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name=f"exit-with-{pid}", daemon=True).start()
    return True
