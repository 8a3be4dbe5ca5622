"""Drift as Prometheus gauges on the manager's /metrics, refreshed by a background task (never on a request path):
one child per model, version, feature or score, and window; a version silent for a day loses its children."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Gauge

from fresco.monitoring.drift import Drift
from model_manager.drift_monitor import DriftMonitor, VersionBasis
from model_manager.monitor_store import DAY_S
from model_manager.window_sketches import KIND_NAMES
from model_manager.windows import MetricWindow

log = logging.getLogger(__name__)
LABELS = ("model", "version", "feature", "kind", "window")
Labels = tuple[str, str, str, str, str]
PRUNE_EVERY_S = 60.0


def _value(value: float | None) -> float:
    return math.nan if value is None else value


class DriftGauges:
    """The drift gauges and what sets them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, text: str) -> Gauge:
            return Gauge(name, text, LABELS, registry=registry)

        self.psi = gauge("fresco_feature_drift_psi", "Population stability index against training, per window.")
        self.ks = gauge("fresco_feature_drift_ks", "Kolmogorov-Smirnov distance from training, per window.")
        self.js = gauge("fresco_feature_drift_js", "Jensen-Shannon distance (base 2) from training, per window.")
        self.null_rate = gauge("fresco_feature_null_rate", "Share of null values served, per window.")
        self.out_of_range = gauge(
            "fresco_feature_out_of_range_rate", "Share of served values outside what training saw, per window."
        )
        self.breached = gauge(
            "fresco_feature_drift_breached", "1 when the window was judged and a drift limit is breached, else 0."
        )
        self.values = gauge("fresco_feature_drift_values", "Values served in the window, nulls included.")
        self._all = (self.psi, self.ks, self.js, self.null_rate, self.out_of_range, self.breached, self.values)
        self._children: dict[tuple[str, int], set[Labels]] = {}

    def put(self, model: str, version: int, window: str, kind: int, drift: Drift) -> None:
        """One name's drift over one window."""
        labels: Labels = (model, str(version), drift.name, KIND_NAMES.get(kind, "feature"), window)
        # Unjudged distributions export NaN: alert rules on these gauges never fire on a window too small to judge.
        judged = drift.distribution_judged
        self.psi.labels(*labels).set(_value(drift.psi) if judged else math.nan)
        self.ks.labels(*labels).set(_value(drift.ks) if judged else math.nan)
        self.js.labels(*labels).set(_value(drift.js) if judged else math.nan)
        self.null_rate.labels(*labels).set(drift.null_rate if drift.count else math.nan)
        self.out_of_range.labels(*labels).set(_value(drift.out_of_range))
        self.breached.labels(*labels).set(1.0 if drift.judged and drift.breached else 0.0)
        self.values.labels(*labels).set(drift.count)
        self._children.setdefault((model, version), set()).add(labels)

    def keep_only(self, versions: set[tuple[str, int]]) -> int:
        """Removes the children of versions not in `versions`; how many versions went."""
        gone = [key for key in self._children if key not in versions]
        for key in gone:
            for labels in self._children.pop(key):
                for gauge in self._all:
                    with contextlib.suppress(KeyError):
                        gauge.remove(*labels)
        return len(gone)


class DriftRefresher:
    """Every few seconds: each version that reported in the last day, its drift in every window, into the gauges;
    the store pruned once a minute."""

    def __init__(
        self,
        monitor: DriftMonitor,
        gauges: DriftGauges,
        basis_of: Callable[[str, int], VersionBasis | None],
        interval_s: float,
        backlog: list[MetricWindow] | None = None,
    ) -> None:
        self.monitor = monitor
        self.gauges = gauges
        self.basis_of = basis_of  # blocking: called in a worker thread
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._pruned_at = -math.inf
        self._backlog = backlog or []  # windows to merge (once) before the first refresh

    def refresh(self) -> int:
        """Blocking: sets every gauge now; how many versions were refreshed."""
        if self._backlog:
            self.monitor.store.add(self._backlog)
            self._backlog = []
        now = self.monitor.clock()
        if now - self._pruned_at >= PRUNE_EVERY_S:
            self.monitor.store.prune()
            self._pruned_at = now
        versions = self.monitor.store.reporting(now - DAY_S)
        done = 0
        for model, version in sorted(versions):
            basis = self.basis_of(model, version)
            if basis is None:
                continue
            for window, drifts in self.monitor.drifts(basis, now).items():
                for (kind, _), drift in drifts.items():
                    self.gauges.put(model, version, window, kind, drift)
            done += 1
        self.gauges.keep_only(versions)
        return done

    def start(self) -> None:
        """Start refreshing in the background."""
        self._task = asyncio.create_task(self._run(), name="drift-gauges")

    async def stop(self) -> None:
        """Stop refreshing."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.refresh)
            except asyncio.CancelledError:
                raise
            except Exception:  # the next pass tries again; the gauges keep their last values meanwhile
                log.exception("drift gauges: a refresh failed")
            await asyncio.sleep(self.interval_s)
