"""The zygote `--workers N` forks its workers from: one process that has imported the predictor once.

Started as a new process, each worker would import gRPC, numpy, protobuf and the predictor's modules
itself: about 50 MB of Python heap per worker, the same bytes N times. Forked from a process that has
already imported them (and frozen them out of the garbage collector's reach, so that collections do
not write to their pages), the workers share those pages copy-on-write until they change them.

The zygote is multiprocessing's fork server, started before any worker with the workers' environment.
It forks from a single thread that has created no gRPC channel, server or ONNX Runtime environment:
gRPC and ONNX Runtime are only initialised in each worker, after the fork. A worker's output goes to
a pipe the supervisor reads, as before.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import sys
from collections.abc import Mapping
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext

# What the zygote imports before forking (the module freezes what it imported).
PRELOAD = ("predictor.zygote_preload",)


def start_zygote(env: Mapping[str, str]) -> ForkServerContext:
    """Start the zygote with `env` added to this process's environment (for it and its workers only)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    saved = dict(os.environ)
    os.environ.update(env)  # read at import by the preloaded modules (Prometheus' multiprocess mode)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return context


def run_worker(argv: list[str], output: Connection) -> None:
    """A forked worker's life: its output to the supervisor's pipe, then the predictor until SIGTERM."""
    os.dup2(output.fileno(), 1)
    os.dup2(output.fileno(), 2)
    output.close()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    from chassis.lifetime import exit_with_parent
    from chassis.logs import configure_logging
    from chassis.settings import parse_settings
    from predictor.server import run_predictor
    from predictor.settings import PredictorSettings

    # The zygote exits when the supervisor does (it watches a pipe the supervisor holds), and this
    # worker when the zygote does. A supervisor gone before that was armed is caught here.
    exit_with_parent(os.getppid())
    settings = parse_settings(PredictorSettings, argv)
    if settings.supervisor_pid and not _alive(settings.supervisor_pid):
        sys.exit(f"predictor worker: supervisor {settings.supervisor_pid} is gone")
    configure_logging("predictor", settings.log_level, settings.log_format)
    run_predictor(settings)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
