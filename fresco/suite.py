"""Running Fresco services as real processes on loopback: start one, learn its port, wait until
its health check says SERVING, and stop it cleanly. `fresco up`, the demo and the integration tests
all start services through here, the way a user would."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chassis.auth import Role, new_token, token_line
from fresco.credentials import ClientSecurity

_LISTENING = re.compile(
    r"^(?P<name>\S+) listening on (?P<address>\S+?)(?: metrics=(?P<metrics>\S+?))?(?: http=(?P<http>\S+?))?"
    r"(?: workers=(?P<workers>\d+))?$"
)


class ServiceFailed(RuntimeError):
    """A service process exited or did not become healthy in time."""


@dataclass
class ServiceProcess:
    """One service started as `python -m <module> <args>`, its output captured line by line."""

    module: str
    args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    address: str = ""
    metrics_url: str = ""
    http_url: str = ""  # the predictor's KServe v2 REST endpoint, e.g. http://127.0.0.1:8000
    workers: int = 1
    security: ClientSecurity = field(default_factory=ClientSecurity)
    process: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)
    _announced: threading.Event = field(default_factory=threading.Event)
    _reader: threading.Thread | None = None

    def start(self, timeout_s: float = 60.0) -> ServiceProcess:
        """Start the process and wait for it to print where it listens."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            # Its own session, so a terminal's Ctrl-C reaches only the parent, which then stops the
            # services in reverse dependency order.
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._pump, name=f"{self.module}-output", daemon=True)
        self._reader.start()
        if not self._announced.wait(timeout_s) or not self.address:
            self.stop()
            raise ServiceFailed(f"{self.module} did not announce its port within {timeout_s}s:\n{self.output()}")
        return self

    def _pump(self) -> None:
        if self.process is None or self.process.stdout is None:
            return
        log = self.log_path.open("a") if self.log_path else None
        try:
            for line in self.process.stdout:
                self.lines.append(line)
                if log:
                    log.write(line)
                    log.flush()
                match = _LISTENING.match(line.strip())
                if match and not self._announced.is_set():
                    self.address = match["address"]
                    self.metrics_url = match["metrics"] or ""
                    self.http_url = match["http"] or ""
                    self.workers = int(match["workers"] or 1)
                    self._announced.set()
        finally:
            self._announced.set()
            if log:
                log.close()

    def output(self) -> str:
        """Everything the process printed so far."""
        return "".join(self.lines)

    def wait_healthy(self, timeout_s: float = 60.0, service: str = "") -> None:
        """Block until the gRPC health check answers SERVING."""
        deadline = time.monotonic() + timeout_s
        with self.security.channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.process is not None and self.process.poll() is not None:
                    raise ServiceFailed(f"{self.module} exited with {self.process.returncode}:\n{self.output()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise ServiceFailed(f"{self.module} not SERVING after {timeout_s}s:\n{self.output()}")
                time.sleep(0.05)

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM, wait for a clean exit, SIGKILL past the grace period; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._reader is not None:
            self._reader.join(5.0)
        # A reader still blocked in readline holds the stream's lock (a process the service left behind
        # keeps the pipe open): closing would wait for it. The daemon thread is left to the pipe's end.
        if self.process.stdout is not None and (self._reader is None or not self._reader.is_alive()):
            self.process.stdout.close()
        return self.process.returncode


@dataclass(frozen=True)
class LocalAuth:
    """Static tokens issued for one local Fresco: the hashed file the services verify against, the
    admin token for the person running it, a viewer token the gateway presents to its peers, and a
    deployer token the services present to the model manager (predictors register, gateways report
    metric windows) and the manager presents to predictors (loads)."""

    tokens_file: Path
    admin_token_file: Path
    gateway_token_file: Path
    control_token_file: Path

    @property
    def admin(self) -> ClientSecurity:
        """Client security carrying the admin token."""
        return ClientSecurity(token=self.admin_token_file.read_text().strip())

    def service_args(self) -> list[str]:
        """Flags turning auth on in a service."""
        return ["--auth-tokens-file", str(self.tokens_file)]


def issue_local_tokens(directory: Path) -> LocalAuth:
    """Fresh random tokens written into `directory` (files readable by their owner only): the
    services' hashed token file, and the admin and gateway tokens themselves."""
    directory.mkdir(parents=True, exist_ok=True)
    admin, gateway, control = new_token(), new_token(), new_token()
    auth = LocalAuth(
        directory / "tokens", directory / "admin.token", directory / "gateway.token", directory / "control.token"
    )
    lines = [
        "# name:role:sha256 of the token; written by fresco for this local run",
        token_line("admin", Role.ADMIN, admin),
        token_line("gateway", Role.VIEWER, gateway),
        token_line("control-plane", Role.DEPLOYER, control),
    ]
    for path, text in (
        (auth.tokens_file, "\n".join(lines)),
        (auth.admin_token_file, admin),
        (auth.gateway_token_file, gateway),
        (auth.control_token_file, control),
    ):
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(text + "\n")
    return auth


@dataclass
class Suite:
    """The services of one local Fresco, started in dependency order and stopped in reverse."""

    services: list[ServiceProcess] = field(default_factory=list)

    def start(self, service: ServiceProcess, timeout_s: float = 120.0) -> ServiceProcess:
        """Start a service and wait until it is healthy; on failure stop everything started."""
        self.services.append(service)
        try:
            service.start(timeout_s)
            service.wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        return service

    def service(self, module: str) -> ServiceProcess:
        """The running service started as `python -m <module>`; KeyError when there is none."""
        for service in self.services:
            if service.module == module:
                return service
        raise KeyError(f"{module}: not started in this suite (started: {[s.module for s in self.services]})")

    def stop(self) -> dict[str, int | None]:
        """Stop every service, newest first; their exit codes by module."""
        codes = {}
        for service in reversed(self.services):
            codes[service.module] = service.stop()
        self.services.clear()
        return codes


def start_suite(
    model_repository: Path,
    env: Mapping[str, str] | None = None,
    log_dir: Path | None = None,
    feature_definitions: Path | None = None,
    feature_db: Path | None = None,
    auth: LocalAuth | None = None,
) -> Suite:
    """Predictor (and, given feature definitions, the feature service on its embedded SQLite
    store) and the gateway on free loopback ports, healthy, the gateway routed to them; with `auth`,
    every service verifies bearer tokens and the gateway presents its own to its peers."""
    suite = Suite()
    extra = dict(env or {})
    auth_args = auth.service_args() if auth else []
    gateway_args: list[str] = ["--peer-token-file", str(auth.gateway_token_file)] if auth else []
    try:
        if feature_definitions is not None:
            db = feature_db or (log_dir or model_repository.parent) / "fresco-features.db"
            features = suite.start(
                ServiceProcess(
                    "feature_service",
                    ["--definitions", str(feature_definitions), "--sqlite-path", str(db), "--port", "0", *auth_args],
                    env=extra,
                    log_path=log_dir / "feature_service.log" if log_dir else None,
                )
            )
            gateway_args += ["--feature-service", features.address]
        predictor = suite.start(
            ServiceProcess(
                "predictor",
                ["--model-repository", str(model_repository), "--port", "0", *auth_args],
                env=extra,
                log_path=log_dir / "predictor.log" if log_dir else None,
            )
        )
        suite.start(
            ServiceProcess(
                "gateway",
                ["--predictor", predictor.address, "--port", "0", *gateway_args, *auth_args],
                env=extra,
                log_path=log_dir / "gateway.log" if log_dir else None,
            )
        )
    except BaseException:
        suite.stop()
        raise
    return suite


def experiment_args(suite: Suite, token_file: Path) -> list[str]:
    """The gateway's flags for the suite's experiment service, when one was started: assignment configuration
    from it, exposures to it (with a token allowed to log them)."""
    try:
        service = suite.service("experiment_service")
    except KeyError:
        return []
    return ["--experiment-service", service.address, "--experiment-service-token-file", str(token_file)]


def start_platform(
    root: Path,
    auth: LocalAuth,
    env: Mapping[str, str] | None = None,
    window_s: float = 10.0,
    experiments: bool = False,
    experiment_flags: Sequence[str] = (),
    manager_flags: Sequence[str] = (),
) -> Suite:
    """The model manager (SQLite and artifacts under `root/manager`, `manager_flags` added to its flags), a
    predictor that joins its fleet with an empty repository, with `experiments` the experiment service (its state
    under `root/experiments`, `experiment_flags` added to its flags), and a gateway routed by the manager's
    WatchRoutes, on free loopback ports, healthy, auth on: models reach the predictor only through the manager.
    Services start in that order (`Suite.service(module)` finds one by name)."""
    suite = Suite()
    extra = dict(env or {})
    auth_args = auth.service_args()
    control = str(auth.control_token_file)
    (root / "predictor-models").mkdir(parents=True, exist_ok=True)
    try:
        manager = suite.start(
            ServiceProcess(
                "model_manager",
                [
                    "--data-dir",
                    str(root / "manager"),
                    "--port",
                    "0",
                    "--metrics-window-s",
                    str(window_s),
                    "--heartbeat-interval-s",
                    "0.5",
                    "--peer-token-file",
                    control,
                    *auth_args,
                    *manager_flags,
                ],
                env=extra,
                log_path=root / "model_manager.log",
            )
        )
        suite.start(
            ServiceProcess(
                "predictor",
                [
                    "--model-repository",
                    str(root / "predictor-models"),
                    "--port",
                    "0",
                    "--model-control-mode",
                    "explicit",
                    "--model-manager-address",
                    manager.address,
                    "--model-manager-token-file",
                    control,
                    *auth_args,
                ],
                env=extra,
                log_path=root / "predictor.log",
            )
        )
        if experiments:
            suite.start(
                ServiceProcess(
                    "experiment_service",
                    [
                        "--state-dir",
                        str(root / "experiments"),
                        "--port",
                        "0",
                        "--model-manager-address",  # a ship decision promotes there, with the control token
                        manager.address,
                        "--peer-token-file",
                        control,
                        *experiment_flags,
                        *auth_args,
                    ],
                    env=extra,
                    log_path=root / "experiment_service.log",
                )
            )
        suite.start(
            ServiceProcess(
                "gateway",
                [
                    "--model-manager-address",
                    manager.address,
                    "--model-manager-token-file",
                    control,
                    "--peer-token-file",
                    str(auth.gateway_token_file),
                    "--state-dir",
                    str(root / "gateway-state"),
                    "--port",
                    "0",
                    *experiment_args(suite, auth.control_token_file),
                    *auth_args,
                ],
                env=extra,
                log_path=root / "gateway.log",
            )
        )
    except BaseException:
        suite.stop()
        raise
    return suite
