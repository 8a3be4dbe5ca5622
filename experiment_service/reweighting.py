"""The bandit loop: every update interval, each running bandit's reward statistics go through Thompson sampling,
and new weights become a new allocation of the phase (version + 1, audited as "bandit", published to gateways)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final, Protocol

from chassis.errors import FrescoError
from experiment_service.bandit import ArmReward, BanditWeights, limits, seed_for, thompson
from experiment_service.catalog import ExperimentCatalog
from experiment_service.sufficient import SufficientStats
from experiment_service.validation import reward_metric
from fresco.api.experiments.v1 import experiment_pb2 as xpb

log = logging.getLogger(__name__)
IDENTITY: Final = "bandit"
DEFAULT_INTERVAL_S: Final = 60.0


class StatsReader(Protocol):
    """Where the per-arm statistics of a phase are read: the part of `stats_store.StatsReader` the loop needs."""

    async def arm_stats(self, key: str, phase: int) -> dict[str, dict[str, SufficientStats]]:
        """arm -> metric -> statistics of the experiment's phase."""
        ...


def interval_s(e: xpb.Experiment) -> float:
    """How often the bandit's weights are recomputed (0 in its settings means 60 s)."""
    return e.bandit.update_interval.ToTimedelta().total_seconds() or DEFAULT_INTERVAL_S


class BanditLoop:
    """Re-weights running bandits on their update intervals. Runs on the server's event loop; sampling runs in a
    worker thread."""

    def __init__(
        self,
        catalog: ExperimentCatalog,
        stats: StatsReader,
        tick_s: float = 1.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.catalog = catalog
        self.stats = stats
        self.tick_s = tick_s
        self._clock = clock
        self._due: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def start(self) -> None:
        """Run rounds every tick until `stop`."""
        self._task = asyncio.create_task(self._run(), name="bandit-loop")

    async def stop(self) -> None:
        """Stop between rounds (a re-weighting under way finishes first)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.run_due()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad round must not end re-weighting for good
                log.exception("bandit round failed; retrying next tick")
            await asyncio.sleep(self.tick_s)

    async def run_due(self) -> list[str]:
        """One round: every running bandit whose interval has passed; the keys re-weighted."""
        now = self._now()
        running = [c.key for c in self.catalog.evaluator.config.experiments if c.type == xpb.EXPERIMENT_TYPE_BANDIT]
        self._due = {key: due for key, due in self._due.items() if key in running}
        changed = []
        for key in running:
            if now < self._due.get(key, now):
                continue
            e = await self.catalog.get(key)
            if e is None or e.status != xpb.EXPERIMENT_STATUS_RUNNING:
                continue
            self._due[key] = now + interval_s(e)
            try:
                if await self.reweight(e) is not None:
                    changed.append(key)
            except FrescoError as err:  # stopped, or a new phase, since it was read: the next round sees it
                log.info("bandit %s not re-weighted: %s", key, err)
        return changed

    async def reweight(self, e: xpb.Experiment) -> BanditWeights | None:
        """Sample new weights for a running bandit; the result when they were published, None while an arm lacks
        its minimum sample."""
        metric = reward_metric(e)
        if metric is None or not e.phases:
            return None
        phase = e.phases[-1].number
        stats = await self.stats.arm_stats(e.key, phase)
        arms = []
        for arm in e.arms:
            s = stats.get(arm.name, {}).get(metric.name)
            arms.append(ArmReward(arm.name, s.n, s.sx, s.sxx) if s is not None else ArmReward(arm.name, 0, 0.0, 0.0))
        allocations = await self.catalog.allocations(e.key, phase)
        seed = seed_for(e.key, phase, max(allocations, default=0) + 1)
        min_share, min_units = limits(e.bandit)
        result = await asyncio.to_thread(thompson, arms, metric.kind, metric.direction, min_share, min_units, seed)
        if not result.reweighted:
            return None
        await self.catalog.reweight(e.key, phase, result.weights, IDENTITY)
        log.info("bandit %s phase %d re-weighted to %s", e.key, phase, [round(w, 4) for w in result.weights])
        return result
