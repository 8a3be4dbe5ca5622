"""The experiment catalog: the registry other parts of the service call (results, decisions, the bandit loop), and
the assignment configuration every change of a running experiment publishes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.timestamp_pb2 import Timestamp

from chassis.errors import FrescoError, NotFound
from experiment_service import lifecycle
from experiment_service.store import Change, Committed, ExperimentStore, now_us
from experiment_service.validation import check_key
from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.api.experiments.v1 import experiment_service_pb2 as spb
from fresco.experiments.evaluator import Evaluator, config_of

Listener = Callable[[apb.AssignmentConfig], None]
log = logging.getLogger(__name__)
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0


class VersionHolds(Protocol):
    """Where a running experiment's arm versions are held warm and routable (the model manager's HoldVersions)."""

    async def hold(self, model_name: str, experiment_key: str, versions: Sequence[int], reason: str) -> None:
        """Hold exactly `versions` for the experiment; none releases them."""
        ...


def held_versions(experiment: xpb.Experiment) -> frozenset[int]:
    """The versions a running experiment routes its arms to; none when it is not running."""
    if experiment.status != lifecycle.RUNNING or not experiment.model_name:
        return frozenset()
    return frozenset(a.model_version for a in experiment.arms if a.model_version)


class ExperimentCatalog:
    """Experiments, their lifecycle and the assignment configuration of the running ones. Changes go one at a time
    (on the event loop), so configuration revisions are published in the order they were committed."""

    def __init__(self, store: ExperimentStore, clock: Callable[[], int] = now_us) -> None:
        self.store = store
        self._clock = clock
        self._lock = asyncio.Lock()
        self._revision = 0
        self._configs: dict[str, apb.ExperimentConfig] = {}
        self._listeners: list[Listener] = []
        self._evaluator = Evaluator()
        self.holds: VersionHolds | None = None  # the model manager, when the service has one
        self._retries: dict[str, asyncio.Task[None]] = {}  # holds being retried while the model manager is down

    @property
    def evaluator(self) -> Evaluator:
        """Assigns from the current configuration (what gateways assign from once they applied it)."""
        return self._evaluator

    async def load(self) -> apb.AssignmentConfig:
        """Read the running experiments and the configuration revision back from the store."""
        revision, running = await asyncio.to_thread(self.store.running)
        self._revision = revision
        self._configs = {e.key: config_of(e, allocation) for e, allocation in running}
        config = self.config()
        self._evaluator = Evaluator(config)
        return config

    async def refresh(self) -> bool:
        """Publish what other replicas of the service committed on the same database since; whether it did."""
        async with self._lock:
            return await self._follow()

    async def catch_up(self, revision: int) -> None:
        """Publish past `revision`, one a gateway holds from before this registry (its database restored or started
        afresh): gateways refuse a snapshot below the revision they hold."""
        async with self._lock:
            await self._follow()
            if revision > self._revision:
                await asyncio.to_thread(self.store.advance_revision, revision + 1)
                await self._follow()

    async def _follow(self) -> bool:
        if await asyncio.to_thread(self.store.revision) <= self._revision:
            return False
        self._announce(await self.load())
        return True

    def config(self) -> apb.AssignmentConfig:
        """The current assignment configuration: every running experiment, by key."""
        generated = Timestamp()
        generated.GetCurrentTime()
        experiments = [self._configs[k] for k in sorted(self._configs)]
        return apb.AssignmentConfig(revision=self._revision, experiments=experiments, generated_at=generated)

    def on_publish(self, listener: Listener) -> None:
        """Call `listener` with every configuration published."""
        self._listeners.append(listener)

    # --- reads ---------------------------------------------------------------------------------------------

    async def get(self, key: str) -> xpb.Experiment | None:
        """The experiment, or None when there is none."""
        return await asyncio.to_thread(self.store.get, key)

    async def require(self, key: str, field: str = "key") -> xpb.Experiment:
        """The experiment; NOT_FOUND when there is none (INVALID_ARGUMENT for a malformed key)."""
        check_key(key, field)
        found = await self.get(key)
        if found is None:
            raise NotFound(f"{field}: no experiment {key!r}")
        return found

    async def page(
        self, statuses: Sequence[int], model_name: str, limit: int, after: str = ""
    ) -> tuple[list[xpb.Experiment], bool]:
        """A page of experiments by key, and whether more follow."""
        return await asyncio.to_thread(self.store.page, statuses, model_name, limit, after)

    async def allocations(self, key: str, phase: int) -> dict[int, tuple[float, ...]]:
        """The weights in force per allocation of the phase (A/B tests: {0: the phase's weights})."""
        return await asyncio.to_thread(self.store.allocations, key, phase)

    async def audit(self, key: str) -> list[spb.AuditEntry]:
        """The experiment's audit entries, oldest first."""
        check_key(key)
        return await asyncio.to_thread(self.store.audit, key)

    # --- changes -------------------------------------------------------------------------------------------

    async def create(self, experiment: xpb.Experiment, identity: str) -> xpb.Experiment:
        """Create a DRAFT experiment at version 1 (validated; ALREADY_EXISTS for a taken key)."""
        at = self._clock()
        e = lifecycle.new_experiment(experiment, identity, at)
        return await asyncio.to_thread(self.store.create, e, identity, at)

    async def update(
        self, key: str, patch: xpb.Experiment, paths: Sequence[str], expected_version: int, identity: str
    ) -> tuple[xpb.Experiment, bool]:
        """Change the named fields; the experiment after it, and whether a new phase started."""
        committed = await self._change(
            key, lambda e, at: lifecycle.update(e, patch, paths, expected_version, identity, at)
        )
        return committed.experiment, committed.started_phase

    async def start(self, key: str, expected_version: int, identity: str) -> xpb.Experiment:
        """DRAFT -> RUNNING, published to gateways."""
        return (await self._change(key, lambda e, at: lifecycle.start(e, expected_version, identity, at))).experiment

    async def stop(self, key: str, expected_version: int, reason: str, identity: str) -> xpb.Experiment:
        """RUNNING -> STOPPED, withdrawn from gateways."""
        change = await self._change(key, lambda e, at: lifecycle.stop(e, expected_version, reason, identity, at))
        return change.experiment

    async def decide(
        self, key: str, expected_version: int, record: xpb.DecisionRecord, identity: str
    ) -> xpb.Experiment:
        """RUNNING or STOPPED -> DECIDED with `record` (decided_at and decided_by set here), audited."""
        change = await self._change(key, lambda e, at: lifecycle.decide(e, expected_version, record, identity, at))
        return change.experiment

    async def reweight(
        self, key: str, phase: int, weights: Sequence[float], identity: str = "bandit"
    ) -> xpb.Experiment:
        """A running bandit's new allocation in `phase`: version + 1, audited and published like any change."""
        change = await self._change(key, lambda e, at: lifecycle.reweight(e, phase, weights, identity, at))
        return change.experiment

    async def _change(self, key: str, make: Callable[[xpb.Experiment, int], Change]) -> _Done:
        # Shielded: a caller that goes away (its deadline, a cancelled RPC) while the commit runs in its thread, which
        # commits all the same, must not leave the change unpublished or its holds half done.
        return await asyncio.shield(self._apply(key, make))

    async def _apply(self, key: str, make: Callable[[xpb.Experiment, int], Change]) -> _Done:
        async with self._lock:
            current = await self.require(key)
            change = make(current, self._clock())
            before, after = held_versions(current), held_versions(change.experiment)
            self._cancel_retry(key)  # this change decides what is held now
            if self.holds is not None and after and after != before:
                # Held before the change commits: an experiment never runs with an arm the model manager refused
                # (an unknown or rejected version), and gateways never get a configuration whose arms are cold.
                await self.holds.hold(change.experiment.model_name, key, sorted(after), change.action)
            try:
                committed = await asyncio.to_thread(self.store.commit, change)
            except BaseException:
                if self.holds is not None and after and after != before:
                    # Not committed (another replica changed it first, the database is down): the stored experiment
                    # still runs on what it held before, or on nothing.
                    await self._rehold(current, before, "not committed: " + change.action)
                raise
            if committed.revision == self._revision + 1:
                self._publish(committed)
            elif committed.revision:  # another replica published in between: all of it is read back
                await self._follow()
            if self.holds is not None and before and not after:
                await self._rehold(change.experiment, frozenset(), change.action)
        return _Done(committed.experiment, change.new_phase is not None and current.status == lifecycle.RUNNING)

    async def _rehold(self, experiment: xpb.Experiment, versions: frozenset[int], why: str) -> None:
        """Hold exactly `versions` (none: let the model manager unload the arms' versions). A failure (the manager
        down) is logged and retried in the background, with backoff, until it succeeds or a later change of the
        experiment decides its holds: a release is never silently dropped."""
        assert self.holds is not None
        try:
            await self.holds.hold(experiment.model_name, experiment.key, sorted(versions), why)
        except FrescoError as err:
            log.warning("experiment %s: its arm versions stay held as they were in the model manager, retrying: %s",
                        experiment.key, err)  # fmt: skip
            self._retries[experiment.key] = asyncio.create_task(self._retry_hold(experiment, versions, why))

    async def _retry_hold(self, experiment: xpb.Experiment, versions: frozenset[int], why: str) -> None:
        assert self.holds is not None
        delay = RETRY_FIRST_S
        while True:
            await asyncio.sleep(delay)
            try:
                await self.holds.hold(experiment.model_name, experiment.key, sorted(versions), why)
            except FrescoError as err:
                log.warning("experiment %s: holding %s in the model manager failed again: %s",
                            experiment.key, sorted(versions), err)  # fmt: skip
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            self._retries.pop(experiment.key, None)
            log.info("experiment %s: the model manager now holds %s for it", experiment.key, sorted(versions))
            return

    def _cancel_retry(self, key: str) -> None:
        task = self._retries.pop(key, None)
        if task is not None:
            task.cancel()

    def pending_holds(self) -> list[str]:
        """The experiments whose holds are being retried."""
        return sorted(self._retries)

    async def close(self) -> None:
        """Stop retrying holds (the process is stopping)."""
        for key in list(self._retries):
            self._cancel_retry(key)

    def _publish(self, committed: Committed) -> None:
        e = committed.experiment
        if e.status == lifecycle.RUNNING:
            self._configs[e.key] = config_of(e, committed.allocation)
        else:
            self._configs.pop(e.key, None)
        self._revision = committed.revision
        config = self.config()
        self._evaluator = Evaluator(config)
        self._announce(config)

    def _announce(self, config: apb.AssignmentConfig) -> None:
        for listener in list(self._listeners):
            listener(config)


@dataclass(frozen=True)
class _Done:
    """What a change produced."""

    experiment: xpb.Experiment
    started_phase: bool
