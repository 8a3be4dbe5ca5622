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
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

# What the zygote imports before forking (the module freezes what it imported).
PRELOAD = ("predictor.zygote_preload",)


class Zygote:
    """The fork server and the environment it runs with; restarted with that environment if it died."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(list(PRELOAD))
        self._ensure_running()

    def process(self, target: Callable[..., object], args: tuple[object, ...], name: str) -> BaseProcess:
        """A process to be forked from the zygote (not started)."""
        self._ensure_running()  # otherwise `start()` would restart a dead zygote without `env`
        return self.context.Process(target=target, args=args, name=name)

    def _ensure_running(self) -> None:
        saved = dict(os.environ)
        os.environ.update(self.env)  # read at import by the preloaded modules (Prometheus' multiprocess mode)
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)


def run_worker(argv: list[str], output: Connection) -> None:
    """A forked worker's life: its output to the supervisor's pipe, then the predictor until SIGTERM."""
    os.dup2(output.fileno(), 1)
    os.dup2(output.fileno(), 2)
    output.close()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    from chassis.lifetime import exit_with_process
    from chassis.logs import configure_logging
    from chassis.settings import parse_settings
    from predictor.server import run_predictor
    from predictor.settings import PredictorSettings

    settings = parse_settings(PredictorSettings, argv)
    # Not the zygote's death but the supervisor's ends a worker: the zygote lives as long as any
    # worker does (each holds the pipe it watches), and the supervisor restarts a zygote that died.
    if settings.supervisor_pid:
        exit_with_process(settings.supervisor_pid)
    configure_logging("predictor", settings.log_level, settings.log_format)
    run_predictor(settings)
