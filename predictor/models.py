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

import numpy as np

from chassis.errors import FrescoError, InvalidArgument, NotFound, Unavailable
from predictor.backends import backend_for
from predictor.backends.base import BackendOptions, Session, TensorSpec
from predictor.config import ModelConfig, read_config
from predictor.repository import ModelRepository
from predictor.stats import VersionStats
from predictor.warmup import synthetic_inputs

log = logging.getLogger(__name__)


class State(enum.Enum):
    """A model version's state, as RepositoryIndex reports it."""

    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass
class ModelVersion:
    """One version of a model: its session once loaded, and the requests using it now."""

    name: str
    version: int
    state: State = State.LOADING
    reason: str = ""
    session: Session | None = None
    load_seconds: float = 0.0
    warm_seconds: float = 0.0
    in_flight: int = 0
    stats: VersionStats = field(default_factory=VersionStats)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._idle.set()

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return self._ready_session().inputs

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return self._ready_session().outputs

    def _ready_session(self) -> Session:
        if self.session is None:
            raise Unavailable(f"model {self.name!r} version {self.version} is {self.state.value}")
        return self.session

    @asynccontextmanager
    async def use(self) -> AsyncIterator[Session]:
        """Hold the version while a request runs on it, so unloading waits for the request."""
        if self.state is not State.READY or self.session is None:
            raise Unavailable(f"model {self.name!r} version {self.version} is {self.state.value}, not READY")
        self.in_flight += 1
        self._idle.clear()
        try:
            yield self.session
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

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

    def __init__(self, repository: ModelRepository, executor: Executor, options: BackendOptions | None = None) -> None:
        self.repository = repository
        self.executor = executor
        self.options = options or BackendOptions()
        self.models: dict[str, Model] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def get(self, name: str, version: str = "") -> ModelVersion:
        """A servable model version; NOT_FOUND for unknown names, UNAVAILABLE while not ready."""
        model = self.models.get(name)
        if model is None:
            raise NotFound(f"model {name!r} is not loaded; loaded models: {sorted(self.models)}")
        return model.get(version)

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
            if version.session is not None:
                version.session.close()
                version.session = None

    async def _load_version(self, name: str, number: int, config: ModelConfig) -> ModelVersion:
        version = ModelVersion(name, number)
        loop = asyncio.get_running_loop()
        try:
            path = self.repository.model_file(name, number)
            start = time.perf_counter()
            # Read and build off the loop: a slow disk or a big model must not stall other models.
            model_bytes = await loop.run_in_executor(self.executor, path.read_bytes)
            backend = backend_for(config, self.options)
            session = await loop.run_in_executor(self.executor, backend.load, model_bytes, config)
            version.load_seconds = time.perf_counter() - start
            start = time.perf_counter()
            warm = synthetic_inputs(session.inputs, batch_size=1)
            await loop.run_in_executor(self.executor, session.run, warm, [])
            version.warm_seconds = time.perf_counter() - start
            version.session = session
            version.state = State.READY
        except FileNotFoundError as err:
            version.state, version.reason = State.UNAVAILABLE, f"model file missing: {err.filename}"
        except FrescoError as err:
            version.state, version.reason = State.UNAVAILABLE, str(err)
        except Exception as err:  # a backend failing on a corrupt model must not take the server down
            log.exception("loading %s version %s failed", name, number)
            version.state, version.reason = State.UNAVAILABLE, f"{type(err).__name__}: {err}"
        return version

    async def infer(
        self, version: ModelVersion, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """Run one request on a version, off the event loop."""
        async with version.use() as session:
            loop = asyncio.get_running_loop()
            start = time.perf_counter_ns()
            results = await loop.run_in_executor(self.executor, session.run, inputs, outputs)
            rows = next(iter(inputs.values())).shape[0] if inputs and next(iter(inputs.values())).ndim else 1
            version.stats.record_execution(rows, time.perf_counter_ns() - start)
            return results

    async def close(self) -> None:
        """Unload everything."""
        for name in list(self.models):
            await self.unload(name)
