"""`--workers N`: N predictor processes sharing one port through SO_REUSEPORT, so inference uses
every core. A supervisor starts them, serves their merged Prometheus metrics, restarts a worker
that dies, and on SIGTERM stops them all and waits for their drain."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from predictor.worker_plan import WorkerPlan, socket_path
from predictor.zygote import Zygote, run_worker

_LISTENING = re.compile(r"^predictor listening on \S+")
RESTART_BACKOFF_S = 1.0


def reserve_port(host: str, port: int) -> tuple[int, socket.socket]:
    """A port for the workers to share; the returned socket holds it until they have bound it."""
    holder = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((host, port))
    return holder.getsockname()[1], holder


class Worker:
    """One worker process, forked from the zygote, and the thread copying its output to ours."""

    def __init__(self, index: int, argv: list[str], zygote: Zygote) -> None:
        self.index = index
        self.argv = argv
        self.zygote = zygote
        self.announced = threading.Event()
        self.process = self._spawn()

    def _spawn(self, *extra: str) -> BaseProcess:
        self.announced.clear()
        reader, writer = os.pipe()
        output = Connection(writer, readable=False)
        process = self.zygote.process(run_worker, ([*self.argv, *extra], output), f"predictor-worker-{self.index}")
        try:
            process.start()
        finally:
            output.close()  # the worker holds its own copy: the pipe ends when the worker does
        threading.Thread(target=self._pump, args=(reader,), daemon=True, name=f"worker-{self.index}").start()
        return process

    def _pump(self, reader: int) -> None:
        with open(reader, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if _LISTENING.match(line):
                    self.announced.set()  # the supervisor announces the shared port once, for all
                    continue
                sys.stdout.write(line)
                sys.stdout.flush()

    def exited(self) -> int | None:
        """The worker's exit code (negative: the signal that ended it), or None while it runs."""
        return self.process.exitcode

    def stop(self) -> None:
        if self.process.exitcode is None:
            self.process.terminate()  # SIGTERM: the worker drains, then exits

    def wait(self, timeout_s: float) -> int:
        """The exit code, after SIGKILL if the worker has not exited within `timeout_s`."""
        self.process.join(timeout_s)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
        assert self.process.exitcode is not None
        return self.process.exitcode

    def restart(self) -> None:
        # Its siblings serve what the repository API left loaded: load that, not the start-up set.
        self.process.close()
        self.process = self._spawn("--sync-from-peers")


def worker_argv(argv: list[str], index: int, port: int, peers_dir: Path, http_port: int = -1) -> list[str]:
    """The arguments of one worker: the supervisor's own flags, then the worker's overrides."""
    return [
        *argv,
        "--port",
        str(port),
        "--http-port",
        str(http_port),
        "--metrics-port",
        "-1",
        "--worker-index",
        str(index),
        "--peers-dir",
        str(peers_dir),
        "--supervisor-pid",
        str(os.getpid()),
    ]


def supervise(settings: WorkerPlan, argv: list[str]) -> int:
    """Run `settings.workers` workers on `argv` until SIGTERM or SIGINT; exit 0 when they all stopped cleanly."""
    port, holder = reserve_port(settings.host, settings.port)
    # The HTTP port is shared alike; -1 (off) stays off in every worker.
    http_port, http_holder = -1, None
    if settings.http_port >= 0:
        http_port, http_holder = reserve_port(settings.host, settings.http_port)
    peers_dir = Path(tempfile.mkdtemp(prefix="fresco-predictor-"))
    metrics_dir = peers_dir / "metrics"
    metrics_dir.mkdir()
    # Prometheus' multiprocess mode: each worker writes its samples to files the supervisor merges.
    zygote = Zygote({"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    stopping = threading.Event()
    scraping = threading.Lock()

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    workers = [Worker(i, worker_argv(argv, i, port, peers_dir, http_port), zygote) for i in range(settings.workers)]
    try:
        for worker in workers:
            while not worker.announced.wait(0.1):
                if stopping.is_set() or worker.exited() is not None:
                    if not stopping.is_set():
                        print(f"predictor worker {worker.index} exited with {worker.exited()} before serving")
                    return _shutdown(workers, settings.grace_period_s, failed=True)
        holder.close()
        if http_holder is not None:
            http_holder.close()
        metrics = _serve_metrics(settings, metrics_dir, scraping)
        suffix = f" metrics=http://{settings.host}:{metrics}/metrics" if metrics else ""
        if http_port >= 0:
            scheme = "https" if settings.http_tls else "http"
            suffix += f" http={scheme}://{settings.host}:{http_port}"
        print(f"predictor listening on {settings.host}:{port}{suffix} workers={settings.workers}", flush=True)
        while not stopping.wait(0.2):
            for worker in workers:
                if worker.exited() is not None and not stopping.is_set():
                    print(f"predictor worker {worker.index} exited with {worker.exited()}; restarting")
                    with scraping:  # a scrape lists the files, then reads them: none may go in between
                        for stale in metrics_dir.glob(f"gauge_*_{worker.process.pid}.db"):
                            stale.unlink(missing_ok=True)  # a dead worker's gauges (loaded, in flight) no longer hold
                    time.sleep(RESTART_BACKOFF_S)
                    socket_path(peers_dir, worker.index).unlink(missing_ok=True)
                    worker.restart()
        return _shutdown(workers, settings.grace_period_s, failed=False)
    finally:
        holder.close()
        if http_holder is not None:
            http_holder.close()
        shutil.rmtree(peers_dir, ignore_errors=True)


def _serve_metrics(settings: WorkerPlan, metrics_dir: Path, scraping: threading.Lock) -> int:
    """Serve the workers' merged samples; a scrape holds `scraping` while it reads their files."""
    if settings.metrics_port < 0:
        return 0
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    from predictor.gpu_metrics import register_gpu_metrics

    class WorkersCollector(MultiProcessCollector):
        def collect(self):  # type: ignore[no-untyped-def]
            with scraping:
                # A file a worker has just created is sized (its header written) a moment later.
                files = [str(f) for f in metrics_dir.glob("*.db") if f.stat().st_size >= 8]
                return self.merge(files, accumulate=True)  # type: ignore[no-untyped-call]

    registry = CollectorRegistry()
    WorkersCollector(registry, path=str(metrics_dir))  # type: ignore[no-untyped-call]
    register_gpu_metrics(registry)
    server, _ = start_http_server(settings.metrics_port, addr=settings.host, registry=registry)
    return int(server.server_port)


def _shutdown(workers: list[Worker], grace_s: float, failed: bool) -> int:
    """SIGTERM every worker, wait for their drain, SIGKILL stragglers; 0 only if all exited 0."""
    for worker in workers:
        worker.stop()
    deadline = time.monotonic() + grace_s + 5
    codes = [worker.wait(max(0.1, deadline - time.monotonic())) for worker in workers]
    return 1 if failed or any(codes) else 0
