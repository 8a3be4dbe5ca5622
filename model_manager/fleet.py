"""The predictor fleet: which versions are placed where, loading and unloading them, and keeping each placed
version at its replica count as predictors come, go and get busy."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Set
from dataclasses import dataclass
from typing import Any, Protocol

from chassis.errors import FailedPrecondition, FrescoError, InvalidArgument, Unavailable
from model_manager import schema
from model_manager.loader import Artifact, PredictorLoader, predictor_model_name
from model_manager.placement import Candidate, choose, desired_copies, to_remove
from model_manager.predictors import Copy, Predictor, Predictors, PredictorState, Report
from model_manager.routes import Endpoint

log = logging.getLogger(__name__)
Key = tuple[str, int]


class ArtifactSource(Protocol):
    """Where versions' expected memory and bytes come from (the registry and its store)."""

    async def expected_memory(self, model: str, version: int) -> int: ...

    async def artifact(self, model: str, version: int) -> Artifact: ...


@dataclass
class _Want:
    """A placed version: its replica bounds, and when its repair may be tried again."""

    replicas: int
    max_replicas: int
    retry_at: float = 0.0
    failures: int = 0


class Fleet:
    """Places registry versions on registered predictors and reports where each is warm."""

    def __init__(
        self,
        predictors: Predictors,
        artifacts: ArtifactSource,
        loader: PredictorLoader,
        *,
        heartbeat_interval_s: float,
        copy_request_rate: float,
        tick_s: float = 0.5,
        cooldown_s: float = 10.0,
        retry_max_s: float = 30.0,
        drain_s: float = 1.0,
        leftover_grace_s: float = 30.0,
    ) -> None:
        self.predictors = predictors
        self.artifacts = artifacts
        self.loader = loader
        self.heartbeat_interval_s = heartbeat_interval_s
        self.copy_request_rate = copy_request_rate
        self.tick_s = tick_s
        self.cooldown_s = cooldown_s
        self.retry_max_s = retry_max_s
        self.drain_s = drain_s
        self.leftover_grace_s = leftover_grace_s
        self._retained: frozenset[Key] | None = None  # None until the controller first says what it wants
        self._leftover_since: dict[Key, float] = {}
        self._wanted: dict[Key, _Want] = {}
        self._released: set[Key] = set()
        self._locks: dict[Key, asyncio.Lock] = {}
        self._callbacks: list[Callable[[], None]] = []
        self._warm: dict[Key, frozenset[Endpoint]] = {}
        self._task: asyncio.Task[None] | None = None
        self._repairs: set[asyncio.Task[None]] = set()
        self._started = time.monotonic()
        self._joined = asyncio.Event()  # set at the first registration

    @property
    def lease_s(self) -> float:
        return self.predictors.lease_s

    # -- membership, from the fleet RPCs ------------------------------------------------------------------

    def register(self, report: Report) -> Predictor:
        """A predictor (re)registers."""
        predictor = self.predictors.register(report)
        self._joined.set()
        log.info("predictor %s registered at %s (%s)", report.predictor_id, report.address, predictor.state.value)
        for want in self._wanted.values():
            want.retry_at = 0.0  # new room: versions short of copies may fit now
        self._changed()
        return predictor

    def heartbeat(self, report: Report) -> bool:
        """A predictor reports; False when it must register again."""
        known = self.predictors.heartbeat(report)
        self._changed()
        return known

    # -- the interface rollouts and gates use ---------------------------------------------------------------

    async def ensure_loaded(
        self, model: str, version: int, *, replicas: int = 1, max_replicas: int = 0
    ) -> tuple[Endpoint, ...]:
        """Place the version on `replicas` ready predictors with room (up to `max_replicas` as its request rate
        grows), loaded and warm, and return where it is warm. It stays placed, and is repaired when predictors
        go, until `release()`. FAILED_PRECONDITION when no predictor has room or they refuse it; UNAVAILABLE
        when they cannot be reached; either way the copies that loaded stay and the rest are retried in the
        background until `release()`."""
        schema.model_name("model", model)
        schema.version_number("version", version)
        if replicas < 1:
            raise InvalidArgument(f"replicas: expected 1 or more, got {replicas}")
        if max_replicas < 0:
            raise InvalidArgument(f"max_replicas: expected 0 (as many as replicas) or more, got {max_replicas}")
        await self.artifacts.expected_memory(model, version)  # NOT_FOUND before the version is wanted
        key = (model, version)
        self._released.discard(key)
        want = self._wanted.setdefault(key, _Want(replicas, max_replicas))
        want.replicas, want.max_replicas = replicas, max(replicas, max_replicas)
        await self._await_members()
        async with self._lock(key):
            await self._top_up(key, replicas)
        return self.warm_endpoints(model, version)

    async def _await_members(self) -> None:
        """Just after the manager starts, the predictors that served before have not registered again: wait up to
        one lease for a ready one, so a restart does not fail (and roll back) the loads it asks for at once."""
        remaining = self._started + self.lease_s - time.monotonic()
        if remaining > 0 and not self.predictors.ready():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._joined.wait(), remaining)

    def warm_endpoints(self, model: str, version: int) -> tuple[Endpoint, ...]:
        """Ready, heartbeat-fresh predictors where the version is loaded and ready now, by predictor id."""
        if (model, version) in self._released:
            return ()
        return tuple(p.endpoint for p in self._holders(model, version))

    def predictor_model_name(self, model: str, version: int) -> str:
        """The model name to send in ModelInfer to the warm endpoints (with model_version = str(version))."""
        return predictor_model_name(model, version)

    async def release(self, model: str, version: int) -> None:
        """Stop placing the version and unload it from every predictor holding it; predictors that cannot be
        reached now are unloaded in the background once they answer."""
        key = (model, version)
        self._wanted.pop(key, None)
        self._released.add(key)
        self._changed()
        async with self._lock(key):
            await self._unload_everywhere(key)

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever some version's warm endpoints change."""
        self._callbacks.append(callback)

    def retain(self, wanted: Set[Key]) -> None:
        """What routes and rollouts want loaded. A copy of any other version that nobody placed (through
        `ensure_loaded`: a gate measuring, a rollout loading) is a leftover, say of a manager that restarted
        mid-rollout; it is unloaded once it has been one for `leftover_grace_s`."""
        self._retained = frozenset(wanted)

    # -- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start expiring leases and repairing placed versions in the background."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="fleet")

    async def close(self) -> None:
        """Stop the background work and close the channels to predictors."""
        tasks = [t for t in (self._task, *self._repairs) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.loader.close()

    # -- internals -----------------------------------------------------------------------------------------

    def _lock(self, key: Key) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    def _holders(self, model: str, version: int) -> list[Predictor]:
        name = predictor_model_name(model, version)
        return [p for p in self.predictors.ready() if (c := p.copies.get(name)) is not None and c.ready]

    def _changed(self) -> None:
        """Fire the callbacks if any version's warm endpoints differ from the last time."""
        warm: dict[Key, set[Endpoint]] = {}
        for predictor in self.predictors.ready():
            for copy in predictor.copies.values():
                key = (copy.model_name, copy.version)
                if copy.ready and copy.model_name and key not in self._released:
                    warm.setdefault(key, set()).add(predictor.endpoint)
        frozen = {key: frozenset(endpoints) for key, endpoints in warm.items()}
        if frozen == self._warm:
            return
        self._warm = frozen
        for callback in list(self._callbacks):
            try:
                callback()
            except Exception:
                log.exception("fleet change callback %r failed", callback)

    async def _top_up(self, key: Key, target: int) -> None:
        """Load copies until `target` ready predictors hold the version, or raise why that cannot be."""
        model, version = key
        name = predictor_model_name(model, version)
        need = await self.artifacts.expected_memory(model, version)
        artifact: Artifact | None = None
        failures: list[FrescoError] = []
        tried: set[str] = set()
        while True:
            holders = self._holders(model, version)
            missing = target - len(holders)
            if missing <= 0:
                return
            candidates = [
                Candidate(p.predictor_id, p.report.zone, p.free_bytes())
                for p in self.predictors.ready()
                if name not in p.copies and name not in p.reserved and p.predictor_id not in tried
            ]
            placement = choose(candidates, need, missing, [p.report.zone for p in holders])
            if not placement.chosen:
                break
            if artifact is None:
                artifact = await self.artifacts.artifact(model, version)
            chosen = [p for pid in placement.chosen if (p := self.predictors.get(pid)) is not None]
            tried.update(placement.chosen)
            outcomes = await asyncio.gather(*(self._load(p, name, artifact) for p in chosen), return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, FrescoError):
                    failures.append(outcome)
                elif isinstance(outcome, BaseException):
                    raise outcome
        held = len(self._holders(model, version))
        where = f"{model} version {version}: {held} of {target} copies warm"
        if failures:
            # A refusal says more than an unreachable predictor; report the first of the most telling kind.
            refused = [f for f in failures if isinstance(f, FailedPrecondition)]
            first = (refused or failures)[0]
            kind = FailedPrecondition if refused else Unavailable
            raise kind(f"{where}; {first}")
        raise FailedPrecondition(f"{where}; {placement.shortfall(missing, need)}")

    async def _load(self, predictor: Predictor, name: str, artifact: Artifact) -> None:
        predictor.reserved[name] = artifact.expected_memory_bytes
        try:
            await self.loader.load(predictor.report.address, name, artifact)
        finally:
            predictor.reserved.pop(name, None)
        current = self.predictors.get(predictor.predictor_id)
        if current is None or current.report.boot_id != predictor.report.boot_id:
            raise Unavailable(f"predictor {predictor.predictor_id} restarted while {name} loaded")
        copy = Copy(name, artifact.model, artifact.version, True, artifact.expected_memory_bytes)
        self.predictors.expect_loaded(current, copy)
        log.info("loaded %s on predictor %s", name, predictor.predictor_id)
        self._changed()

    async def _unload_everywhere(self, key: Key) -> None:
        name = predictor_model_name(*key)
        holding = [p for p in self.predictors if p.state is not PredictorState.LOST and name in p.copies]
        await asyncio.gather(*(self._unload(p, name) for p in holding))

    async def _unload(self, predictor: Predictor, name: str) -> None:
        try:
            await self.loader.unload(predictor.report.address, name)
        except FrescoError as err:
            log.warning("unloading %s from predictor %s failed (retried later): %s", name, predictor.predictor_id, err)
            return
        self.predictors.expect_unloaded(predictor, name)
        log.info("unloaded %s from predictor %s", name, predictor.predictor_id)
        self._changed()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                self._tick()
            except Exception:
                log.exception("fleet tick failed")

    def _tick(self) -> None:
        for predictor in self.predictors.expire():
            log.warning(
                "predictor %s at %s lost its lease; its copies are placed elsewhere",
                predictor.predictor_id,
                predictor.report.address,
            )
            address = predictor.report.address
            if not any(p.report.address == address for p in self.predictors.ready()):
                self._spawn(self.loader.forget(address))
        self._changed()
        now = time.monotonic()
        for key, want in list(self._wanted.items()):
            if now >= want.retry_at and not self._lock(key).locked():
                self._spawn(self._reconcile(key, want))
        self._sweep_leftovers(now)
        for key in list(self._released):
            name = predictor_model_name(*key)
            if not self._lock(key).locked() and any(name in p.copies for p in self.predictors.ready()):
                self._spawn(self._retry_release(key))

    def _sweep_leftovers(self, now: float) -> None:
        """Release versions copied on some predictor that no one wants, once they have been leftovers long enough."""
        if self._retained is None:
            return  # after a restart nothing is a leftover before the controller has said what it wants
        held = {
            (c.model_name, c.version)
            for p in self.predictors.ready()
            for c in p.copies.values()
            if c.model_name and c.version > 0
        }
        leftovers = held - self._retained - set(self._wanted) - self._released
        self._leftover_since = {k: self._leftover_since.get(k, now) for k in leftovers}
        for key, since in self._leftover_since.items():
            if now - since >= self.leftover_grace_s and not self._lock(key).locked():
                log.info("%s version %d: copies nobody wants for %.0fs; unloading", *key, now - since)
                self._spawn(self.release(*key))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._repairs.add(task)
        task.add_done_callback(self._repairs.discard)

    async def _retry_release(self, key: Key) -> None:
        async with self._lock(key):
            if key in self._released:
                await self._unload_everywhere(key)

    async def _reconcile(self, key: Key, want: _Want) -> None:
        """Bring a placed version to the copies its replica bounds and request rate call for."""
        async with self._lock(key):
            if self._wanted.get(key) is not want:
                return  # released or replaced meanwhile
            holders = self._holders(*key)
            name = predictor_model_name(*key)
            rate = sum(p.copies[name].request_rate for p in holders)
            target = desired_copies(len(holders), rate, self.copy_request_rate, want.replicas, want.max_replicas)
            now = time.monotonic()
            try:
                if target > len(holders):
                    log.info("%s: %d copies warm, %d wanted (%.1f req/s)", name, len(holders), target, rate)
                    await self._top_up(key, target)
                    want.retry_at = now + self.cooldown_s
                elif target < len(holders):
                    copies = [(p.predictor_id, p.report.zone, p.copies[name].request_rate) for p in holders]
                    leaving = [p for p in holders if p.predictor_id in to_remove(copies, len(holders) - target)]
                    # Out of warm endpoints first, so routes move off the copies before they are unloaded.
                    for predictor in leaving:
                        self.predictors.expect_unloaded(predictor, name)
                    self._changed()
                    await asyncio.sleep(self.drain_s)
                    await asyncio.gather(*(self._unload(p, name) for p in leaving))
                    want.retry_at = now + self.cooldown_s
                want.failures = 0
            except FrescoError as err:
                want.failures += 1
                want.retry_at = now + min(self.retry_max_s, self.tick_s * 2**want.failures)
                log.warning("%s: placing copies failed (attempt %d): %s", name, want.failures, err)
