"""Tying a child process's life to its parent's, so a supervisor killed outright leaves no orphans."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def exit_with_parent(expected_parent: int) -> bool:
    """Ask Linux to send this process SIGTERM when its parent dies; True if armed.

    A parent that died before the call is caught too: the process is then already reparented and
    signals itself. On other systems nothing is armed and False comes back.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return False
    if os.getppid() != expected_parent:
        os.kill(os.getpid(), signal.SIGTERM)
    return True
