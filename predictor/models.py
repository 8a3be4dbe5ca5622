"""Loaded models: their versions, states and in-flight work. Loading runs off the event loop so it
never blocks serving other models; unloading drains in-flight requests first."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import numpy as np
from opentelemetry import trace
from opentelemetry.trace import Tracer

from chassis.errors import FrescoError, InvalidArgument, NotFound, Unavailable
from predictor.backends import backend_for
from predictor.backends.base import BackendOptions, Session, TensorSpec
from predictor.batcher import BatchPolicy, DynamicBatcher, Execution, Request, rows_of
from predictor.config import ModelConfig, read_config
from predictor.metrics import PredictorMetrics, VersionMetrics
from predictor.repository import ModelRepository
from predictor.stats import VersionStats
from predictor.warmup import warm

log = logging.getLogger(__name__)


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
            raise InvalidArgument(f"model_version {version!r}: expected a version number")
        found = self.versions.get(int(version))
        if found is None:
            raise NotFound(f"model {self.name!r} has no version {version}; it serves {sorted(self.versions)}")
        return found


class ModelStore:
    """Every model the predictor knows of, with loading, unloading and inference."""

    def __init__(
        self,
        repository: ModelRepository,
        executor: Executor,
        options: BackendOptions | None = None,
        metrics: PredictorMetrics | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.repository = repository
        self.executor = executor
        self.options = options or BackendOptions()
        self.metrics = metrics
        self.tracer = tracer
        self.models: dict[str, Model] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def get(self, name: str, version: str = "") -> ModelVersion:
        """A servable model version; NOT_FOUND for unknown names, UNAVAILABLE while not ready."""
        return self.model(name).get(version)

    def model(self, name: str) -> Model:
        """A known model, whatever its state."""
        model = self.models.get(name)
        if model is None:
            raise NotFound(f"model {name!r} is not loaded; loaded models: {sorted(self.models)}")
        return model

    async def load_all(self) -> None:
        """Load every model of the repository concurrently; failures leave models UNAVAILABLE."""
        await asyncio.gather(*(self.load(name) for name in self.repository.model_names()))

    async def load(self, name: str) -> Model:
        """Load (or reload) a model's versions; the old versions serve until the new ones are warm."""
        model_dir = self.repository.model_dir(name)  # NOT_FOUND before anything is registered
        async with self._locks.setdefault(name, asyncio.Lock()):
            previous = self.models.get(name)
            model = Model(name)
            if previous is None:
                self.models[name] = model
            try:
                model.config = read_config(model_dir)
                wanted = model.config.version_policy.select(self.repository.versions(name))
                if not wanted:
                    raise InvalidArgument(f"model {name!r}: no version directory matches its version policy")
                loaded = await asyncio.gather(*(self._load_version(name, v, model.config) for v in wanted))
                model.versions = {v.version: v for v in loaded}
                failed = [v for v in loaded if v.state is not State.READY]
                model.state = State.UNAVAILABLE if failed else State.READY
                model.reason = "; ".join(f"version {v.version}: {v.reason}" for v in failed)
            except FrescoError as err:
                model.state, model.reason = State.UNAVAILABLE, str(err)
            if model.state is not State.READY and previous is not None and previous.state is State.READY:
                # A failed reload keeps the versions that work serving, as Triton does.
                previous.reason = f"reload failed, previous versions still serving: {model.reason}"
                log.warning("model %s: %s", name, previous.reason)
                await self._retire(model)
                return model
            self.models[name] = model
            if previous is not None and previous is not model:
                await self._retire(previous)
            log.info("model %s %s %s", name, model.state.value, model.reason)
            return model

    async def unload(self, name: str) -> None:
        """Stop routing to a model, wait for its in-flight requests, then free it."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            model = self.models.pop(name, None)
            if model is None:
                raise NotFound(f"model {name!r} is not loaded")
            await self._retire(model)

    async def _retire(self, model: Model) -> None:
        for version in model.versions.values():
            version.state = State.UNLOADING
        for version in model.versions.values():
            await version.drained()
            if version.batcher is not None:
                await version.batcher.close()
            if version.session is not None:
                version.session.close()
                version.session = None
            if version.metrics is not None:
                version.metrics.loaded.set(0)
                version.metrics.memory_bytes.set(0)

    async def _load_version(self, name: str, number: int, config: ModelConfig) -> ModelVersion:
        version = ModelVersion(name, number, slots=asyncio.Semaphore(config.instance_count))
        if self.metrics is not None:
            version.metrics = self.metrics.bind(name, str(number))
        loop = asyncio.get_running_loop()
        try:
            path = self.repository.model_file(name, number)
            start = time.perf_counter()
            # Read and build off the loop: a slow disk or a big model must not stall other models.
            model_bytes = await loop.run_in_executor(self.executor, path.read_bytes)
            backend = backend_for(config, self.options, model_bytes)
            session = await loop.run_in_executor(self.executor, backend.load, model_bytes, config)
            version.session = session
            version.max_batch_size = batch_capacity(session.inputs, config)
            report = await loop.run_in_executor(self.executor, warm, session, config, version.max_batch_size)
            version.load_seconds = time.perf_counter() - start
            version.warm_seconds, version.warm_p99_ms = report.seconds, report.p99_ms
            if version.max_batch_size and config.batching.enabled:
                version.batcher = DynamicBatcher(
                    partial(session.run, outputs=()),
                    self.executor,
                    BatchPolicy(
                        max_batch_size=version.max_batch_size,
                        max_queue_delay_s=config.batching.max_queue_delay_us / 1e6,
                        preferred_batch_sizes=tuple(config.batching.preferred_batch_sizes),
                        max_queue_size=config.batching.max_queue_size,
                        instances=config.instance_count,
                        inline_below_ns=self.options.inline_below_us * 1000,
                    ),
                    observer=version.record_execution,
                )
            version.state = State.READY
            if version.metrics is not None:
                version.metrics.loaded.set(1)
                version.metrics.memory_bytes.set(session.memory_bytes())
                version.metrics.load_seconds.set(version.load_seconds)
                version.metrics.warm_p99_seconds.set(report.p99_ms / 1000)
        except FileNotFoundError as err:
            version.state, version.reason = State.UNAVAILABLE, f"model file missing: {err.filename}"
        except FrescoError as err:
            version.state, version.reason = State.UNAVAILABLE, str(err)
        except Exception as err:
            log.exception("loading %s version %s failed", name, number)
            version.state, version.reason = State.UNAVAILABLE, f"{type(err).__name__}: {err}"
        if version.state is not State.READY and version.session is not None:
            version.session.close()
            version.session = None
        return version

    async def infer(
        self,
        version: ModelVersion,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        deadline: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run one request on a version, through its batcher when it batches, off the event loop."""
        session = version.acquire()  # not `use()`: an async context manager costs a model run here
        try:
            if version.batcher is not None:
                request = await version.batcher.submit(inputs, deadline)
                self._trace(request)
                results = request.result
            else:
                results = await self._run_alone(version, session, inputs)
        finally:
            version.release()
        return {name: results[name] for name in outputs} if outputs else results

    async def _run_alone(
        self, version: ModelVersion, session: Session, inputs: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        loop = asyncio.get_running_loop()
        arrived = time.perf_counter_ns()
        async with version.slots:
            request = Request(inputs, 1, (), loop.create_future(), arrived, None)
            request.dispatched_ns = time.perf_counter_ns()
            results = await loop.run_in_executor(self.executor, session.run, inputs, ())
            request.finished_ns = time.perf_counter_ns()
        rows = rows_of(inputs) if all(a.ndim for a in inputs.values()) else 1
        elapsed = request.finished_ns - request.dispatched_ns
        version.record_execution(Execution(rows, [request], elapsed, False, elapsed))
        self._trace(request)
        return results

    def _trace(self, request: Request) -> None:
        """Queue and compute spans under the current request's span, from the batcher's clock."""
        if self.tracer is None or not trace.get_current_span().is_recording():
            return
        offset = time.time_ns() - time.perf_counter_ns()
        queue = self.tracer.start_span("queue", start_time=request.arrived_ns + offset)
        queue.end(end_time=request.dispatched_ns + offset)
        compute = self.tracer.start_span("compute", start_time=request.dispatched_ns + offset)
        compute.end(end_time=request.finished_ns + offset)

    async def close(self) -> None:
        """Unload everything."""
        for name in list(self.models):
            await self.unload(name)


def batch_capacity(inputs: Sequence[TensorSpec], config: ModelConfig) -> int:
    """The largest batch a version takes: 0 when its inputs have no variable leading dimension."""
    if not inputs or any(not spec.shape or spec.shape[0] != -1 for spec in inputs):
        return 0
    return config.batching.max_batch_size
