"""Loaded models: loading, unloading and inference. Loading runs off the event loop so it never
blocks serving other models, in two steps (prepare, then commit or abort) so that the workers of
`--workers N` can agree before any of them switches; unloading drains in-flight requests first."""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from opentelemetry import trace
from opentelemetry.trace import Tracer

from chassis.errors import FrescoError, InvalidArgument
from predictor.backends import backend_for
from predictor.backends.base import BackendOptions, Session, TensorSpec
from predictor.batcher import BatchPolicy, DynamicBatcher, Execution, Request, rows_of
from predictor.config import ModelConfig, read_config
from predictor.locks import NamedLocks
from predictor.metrics import PredictorMetrics
from predictor.overrides import LoadOverride, write_files
from predictor.repository import MODEL_FILE, ModelRepository, check_model_name, version_numbers
from predictor.versions import Model, ModelVersion, State, unknown_model
from predictor.warmup import warm

__all__ = ["Model", "ModelStore", "ModelVersion", "Prepared", "State"]

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A model loaded and warmed but not yet served, and the one it would replace."""

    model: Model
    previous: Model | None
    in_repository: bool


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
        self.locks = NamedLocks()
        # Where files sent with RepositoryModelLoad are written, one private directory per load
        # (made on first use, removed on close).
        self.override_root: Path | None = None

    def get(self, name: str, version: str = "") -> ModelVersion:
        """A servable model version; NOT_FOUND for unknown names, UNAVAILABLE while not ready."""
        return self.model(name).get(version)

    def model(self, name: str) -> Model:
        """A known model, whatever its state."""
        model = self.models.get(name)
        if model is None:
            raise unknown_model(name, f"model {name!r} is not loaded; loaded models: {sorted(self.models)}")
        return model

    async def load_all(self) -> None:
        """Load every model of the repository concurrently; failures leave models UNAVAILABLE."""
        await asyncio.gather(*(self.load(name) for name in self.repository.model_names()))

    async def load(self, name: str, override: LoadOverride | None = None) -> Model:
        """Load (or reload) a model's versions; the old versions serve until the new ones are warm,
        and keep serving when the new ones fail, as in Triton."""
        async with self.locks.hold(name):
            prepared = await self.prepare(name, override)
            if prepared.model.state is State.READY:
                return await self.commit(prepared)
            return await self.abort(prepared, prepared.model.reason, keep_partial=True)

    async def prepare(self, name: str, override: LoadOverride | None = None) -> Prepared:
        """Load and warm a model's versions without serving them yet; hold `locks` for `name`
        from here until `commit()` or `abort()`."""
        check_model_name(name)
        if override is not None and override.files:
            assert override.config is not None  # parse_load_parameters insists on it
            if self.override_root is None:
                self.override_root = Path(tempfile.mkdtemp(prefix="fresco-overrides-"))
            model_dir = await asyncio.get_running_loop().run_in_executor(
                self.executor, write_files, self.override_root, name, override.files
            )
            model = Model(name, override_dir=model_dir)
        else:
            model_dir = self.repository.model_dir(name)  # NOT_FOUND before anything is registered
            model = Model(name)
        prepared = Prepared(model, self.models.get(name), self.repository.has_model(name))
        if prepared.previous is None:
            self.models[name] = model  # LOADING in the index meanwhile
        try:
            model.config = override.config if override is not None and override.config else read_config(model_dir)
            wanted = model.config.version_policy.select(version_numbers(model_dir))
            if not wanted:
                raise InvalidArgument(f"model {name!r}: no version directory matches its version policy")
            loaded = await asyncio.gather(*(self._load_version(name, v, model.config, model_dir) for v in wanted))
            model.versions = {v.version: v for v in loaded}
            failed = [v for v in loaded if v.state is not State.READY]
            model.state = State.UNAVAILABLE if failed else State.READY
            model.reason = "; ".join(f"version {v.version}: {v.reason}" for v in failed)
        except FrescoError as err:
            model.state, model.reason = State.UNAVAILABLE, str(err)
        except BaseException:
            self._forget(model)
            await self._retire(model)
            raise
        return prepared

    def _forget(self, model: Model) -> None:
        """Drop a model registered only to show it LOADING."""
        if self.models.get(model.name) is model:
            del self.models[model.name]

    async def commit(self, prepared: Prepared) -> Model:
        """Serve a prepared model, retiring the versions it replaces."""
        model = prepared.model
        self.models[model.name] = model
        if prepared.previous is not None and prepared.previous is not model:
            await self._retire(prepared.previous)
            _mark_loaded(model)  # the same version's gauges were just zeroed with the old session
        log.info("model %s %s %s", model.name, model.state.value, model.reason)
        return model

    async def abort(self, prepared: Prepared, reason: str, keep_partial: bool = False) -> Model:
        """Drop a prepared model. A READY previous model keeps serving; otherwise the model is
        recorded UNAVAILABLE with `reason` (with the versions that did load when `keep_partial`),
        unless the repository does not hold it, so made-up names leave nothing behind."""
        model, previous = prepared.model, prepared.previous
        model.state, model.reason = State.UNAVAILABLE, reason
        if previous is not None and previous.state is State.READY:
            previous.reason = f"reload failed, previous versions still serving: {reason}"
            log.warning("model %s: %s", model.name, previous.reason)
            await self._retire(model)
            _mark_loaded(previous)
            return model
        if keep_partial and prepared.in_repository:
            record = model
        else:
            record = Model(model.name, config=model.config, state=State.UNAVAILABLE, reason=reason)
            await self._retire(model)
        if prepared.in_repository or previous is not None:
            self.models[model.name] = record
            if previous is not None:
                await self._retire(previous)
        else:
            self._forget(model)
            if self.metrics is not None:
                for number in model.versions:
                    self.metrics.forget(model.name, str(number))
        log.info("model %s UNAVAILABLE %s", model.name, reason)
        return record

    async def unload(self, name: str) -> None:
        """Stop routing to a model, wait for its in-flight requests, then free it."""
        if name not in self.models:  # no lock for a name that was never loaded
            raise unknown_model(name, f"model {name!r} is not loaded")
        async with self.locks.hold(name):
            model = self.models.pop(name, None)
            if model is None:
                raise unknown_model(name, f"model {name!r} is not loaded")
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
        if model.override_dir is not None:
            shutil.rmtree(model.override_dir, ignore_errors=True)
            model.override_dir = None

    async def _load_version(self, name: str, number: int, config: ModelConfig, model_dir: Path) -> ModelVersion:
        version = ModelVersion(name, number, slots=asyncio.Semaphore(config.instance_count))
        if self.metrics is not None:
            version.metrics = self.metrics.bind(name, str(number))
        loop = asyncio.get_running_loop()
        try:
            path = model_dir / str(number) / MODEL_FILE
            start = time.perf_counter()
            # Read and build off the loop: a slow disk or a big model must not stall other models.
            model_bytes = await loop.run_in_executor(self.executor, path.read_bytes)
            backend = backend_for(config, self.options, model_bytes)
            session = await loop.run_in_executor(self.executor, backend.load, model_bytes, config)
            version.session = session
            version.max_batch_size = batch_capacity(session.inputs, config)
            report = await loop.run_in_executor(self.executor, warm, session, config, version.max_batch_size, model_dir)
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
        if self.override_root is not None:
            shutil.rmtree(self.override_root, ignore_errors=True)


def _mark_loaded(model: Model) -> None:
    for version in model.versions.values():
        if version.metrics is not None and version.session is not None:
            version.metrics.loaded.set(1)
            version.metrics.memory_bytes.set(version.session.memory_bytes())


def batch_capacity(inputs: Sequence[TensorSpec], config: ModelConfig) -> int:
    """The largest batch a version takes: 0 when its inputs have no variable leading dimension."""
    if not inputs or any(not spec.shape or spec.shape[0] != -1 for spec in inputs):
        return 0
    return config.batching.max_batch_size
