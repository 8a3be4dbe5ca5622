"""A model's served state: its versions, their states, sessions, batchers and in-flight work."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from chassis.errors import InvalidArgument, NotFound, Unavailable
from predictor.backends.base import Session, TensorSpec
from predictor.batcher import DynamicBatcher, Execution
from predictor.config import ModelConfig
from predictor.metrics import VersionMetrics
from predictor.stats import VersionStats


def unknown_model(name: str, detail: str) -> NotFound:
    """Triton's wording for a model it does not serve, which its clients match on, then our detail."""
    return NotFound(f"Request for unknown model: '{name}' is not found; {detail}")


class State(enum.Enum):
    """A model version's state, as RepositoryIndex reports it."""

    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass
class ModelVersion:
    """One version of a model: its session once loaded, its batcher, and the requests using it."""

    name: str
    version: int
    state: State = State.LOADING
    reason: str = ""
    session: Session | None = None
    batcher: DynamicBatcher | None = None
    max_batch_size: int = 0
    load_seconds: float = 0.0
    warm_seconds: float = 0.0
    warm_p99_ms: float = 0.0
    in_flight: int = 0
    stats: VersionStats = field(default_factory=VersionStats)
    metrics: VersionMetrics | None = None
    slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._idle.set()

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return self._ready_session().inputs

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return self._ready_session().outputs

    @property
    def output_datatypes(self) -> dict[str, str]:
        return {spec.name: spec.datatype for spec in self._ready_session().outputs}

    def _ready_session(self) -> Session:
        if self.session is None:
            raise Unavailable(f"model {self.name!r} version {self.version} is {self.state.value}")
        return self.session

    def acquire(self) -> Session:
        """Hold the version for one request, so unloading waits for it; pair with `release()`."""
        if self.state is not State.READY or self.session is None:
            raise Unavailable(f"model {self.name!r} version {self.version} is {self.state.value}, not READY")
        self.in_flight += 1
        self._idle.clear()
        return self.session

    def release(self) -> None:
        """A request that held the version finished."""
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    @asynccontextmanager
    async def use(self) -> AsyncIterator[Session]:
        """`acquire()` and `release()` around a block."""
        session = self.acquire()
        try:
            yield session
        finally:
            self.release()

    def record_request(self, ok: bool, elapsed_ns: int) -> None:
        """One request for this version finished, successfully or not."""
        self.stats.record_request(ok, elapsed_ns)
        if self.metrics is not None:
            (self.metrics.success if ok else self.metrics.failure).inc()
            self.metrics.request_seconds.observe(elapsed_ns / 1e9)

    def record_execution(self, execution: Execution) -> None:
        """One batch ran: statistics and metrics for it and for each request's queue time."""
        self.stats.record_execution(execution)
        for request in execution.requests:
            self.stats.queue.add(request.dispatched_ns - request.arrived_ns)
        if self.metrics is not None:
            self.metrics.executions.inc()
            self.metrics.inferences.inc(execution.rows)
            self.metrics.batch_size.observe(execution.rows)
            self.metrics.compute_seconds.observe(execution.compute_ns / 1e9)
            for request in execution.requests:
                self.metrics.queue_seconds.observe((request.dispatched_ns - request.arrived_ns) / 1e9)

    async def drained(self) -> None:
        """Wait until no request uses this version."""
        await self._idle.wait()


@dataclass
class Model:
    """A model directory's loaded state: its config and the versions served."""

    name: str
    config: ModelConfig | None = None
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    state: State = State.LOADING
    reason: str = ""
    # A private directory holding files sent with RepositoryModelLoad; removed with the model.
    override_dir: Path | None = None

    def default_version(self) -> ModelVersion:
        """The version a request without a version gets: the configured one, else the newest ready."""
        if self.config is not None and self.config.default_version is not None:
            return self.get(str(self.config.default_version))
        ready = [v for v in self.versions.values() if v.state is State.READY]
        if not ready:
            raise Unavailable(
                f"model {self.name!r} has no READY version ({self.state.value}: {self.reason or 'loading'})"
            )
        return max(ready, key=lambda v: v.version)

    def get(self, version: str) -> ModelVersion:
        """A version by its string number; empty means the default."""
        if not version:
            return self.default_version()
        if not (version.isascii() and version.isdigit() and len(version) <= 18):
            # Triton's wording, which its clients match on, then what was expected.
            raise InvalidArgument(
                f"failed to get model version from specified version string '{version}': "
                "model_version must be an integral value > 0"
            )
        found = self.versions.get(int(version))
        if found is None:
            raise NotFound(
                f"Request for unknown model: '{self.name}' version {version} is not found; "
                f"model {self.name!r} has no version {version}; it serves {sorted(self.versions)}"
            )
        return found
