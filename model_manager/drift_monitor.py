"""Drift of a version's features and scores over sliding windows, from the monitor store's merged sketches against
the version's training statistics and drift policy (the shared `fresco.monitoring.drift` measures)."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from fresco.api.features.v1 import statistics_pb2 as spb
from fresco.api.models.v1 import monitoring_pb2 as mpb
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.monitoring.drift import Drift, Limits, limits_for, measure, min_rows
from fresco.monitoring.kll_bytes import kll_problem
from fresco.monitoring.sketches import KLL_K, ColumnSketch
from model_manager import messages
from model_manager.monitor_store import BUCKET_S, DAY_S, WINDOWS, MonitorStore
from model_manager.records import VersionRecord
from model_manager.window_sketches import FEATURE, SCORE, SketchKey

POLICY_WINDOW = "1h"  # the window drifted_features and the drift gate judge by default


@dataclass(frozen=True)
class VersionBasis:
    """What a version's drift is judged against: its training statistics, drift policy and signature's names."""

    model: str
    version: int
    training: Mapping[str, spb.FeatureStatistics]
    policy: rpb.DriftPolicy | None
    inputs: tuple[str, ...]  # feature refs (or input tensor names) in signature order
    outputs: tuple[str, ...]

    @classmethod
    def of(cls, record: VersionRecord) -> VersionBasis:
        """The basis of a registered version; its drift policy as the registry answers it (unset: defaults)."""
        message = messages.version_message(record)
        policy = message.drift_policy if message.HasField("drift_policy") else None
        signature = record.signature
        inputs = tuple(signature.feature_refs) or tuple(t.name for t in signature.inputs)
        return cls(
            model=record.model_name,
            version=record.version,
            training={s.feature_name: _readable(s) for s in record.training_statistics},
            policy=policy,
            inputs=inputs,
            outputs=tuple(t.name for t in signature.outputs),
        )

    def limits(self, name: str) -> Limits:
        """The thresholds of one feature or score."""
        return limits_for(self.policy, name)

    def min_rows(self) -> int:
        """The least values a window needs before it is judged."""
        return min_rows(self.policy)

    def judge(self, sketch: ColumnSketch) -> Drift:
        """One sketch's drift against training's statistics of its name."""
        return measure(sketch, self.training.get(sketch.name), self.limits(sketch.name), self.min_rows())

    def policy_in_force(self) -> rpb.DriftPolicy:
        """The policy with every default filled in."""
        policy = rpb.DriftPolicy()
        if self.policy is not None:
            policy.CopyFrom(self.policy)
        defaults = limits_for(self.policy, "")  # no feature is named "": the policy's defaults over the platform's
        for name in ("max_psi", "max_ks", "max_js", "max_null_rate_increase", "max_out_of_range_rate"):
            setattr(policy.defaults, name, getattr(defaults, name))
        policy.min_rows = self.min_rows()
        return policy


def _readable(stats: spb.FeatureStatistics) -> spb.FeatureStatistics:
    """The statistics without a KLL sketch the library could not read safely (registered before the check existed):
    drift then bins on the histogram."""
    sketch = stats.numeric.kll_sketch
    if not sketch or kll_problem(sketch, KLL_K) is None:
        return stats
    clean = spb.FeatureStatistics()
    clean.CopyFrom(stats)
    clean.numeric.kll_sketch = b""
    return clean


def ordered(keys: Iterable[SketchKey], basis: VersionBasis) -> list[SketchKey]:
    """Inputs first in signature order (then other features by name), then scores in output order (then others)."""
    present = set(keys)
    out = [(FEATURE, name) for name in basis.inputs]
    out += sorted(k for k in present if k[0] == FEATURE and k[1] not in basis.inputs)
    out += [(SCORE, name) for name in basis.outputs if (SCORE, name) in present]
    out += sorted(k for k in present if k[0] == SCORE and k[1] not in basis.outputs)
    return out


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class DriftMonitor:
    """Answers a version's monitor (windows and history per name) from the store; per-bucket drift is cached."""

    def __init__(self, store: MonitorStore, clock: Callable[[], float] | None = None) -> None:
        self.store = store
        self.clock = clock or store.clock
        self._lock = threading.Lock()
        # (model, version, kind, name, bucket) -> (the bucket's sketch when measured, PSI, null rate)
        self._history: dict[tuple[str, int, int, str, int], tuple[ColumnSketch, float, float]] = {}

    def windows(self, basis: VersionBasis, now: float | None = None) -> dict[str, dict[SketchKey, ColumnSketch]]:
        """Each window's merged sketches by (kind, name)."""
        at = self.clock() if now is None else now
        return {name: self.store.window(basis.model, basis.version, length, at) for name, length in WINDOWS.items()}

    def drifts(self, basis: VersionBasis, now: float | None = None) -> dict[str, dict[SketchKey, Drift]]:
        """Each window's drift by (kind, name), for every name with values in any window (none in this one: a
        window of no values, so a gauge never shows what has left the window)."""
        windows = self.windows(basis, now)
        keys = {key for merged in windows.values() for key in merged}
        return {
            window: {key: basis.judge(merged.get(key) or ColumnSketch(key[1], key[0])) for key in keys}
            for window, merged in windows.items()
        }

    def version_monitor(self, basis: VersionBasis, stage: rpb.ModelStage.ValueType) -> mpb.VersionMonitor:
        """The VersionMonitor message of one version now."""
        now = self.clock()
        merged = self.windows(basis, now)
        keys = ordered((k for window in merged.values() for k in window), basis)
        monitor = mpb.VersionMonitor(version=basis.version, stage=stage, policy=basis.policy_in_force())
        for kind, name in keys:
            feature = mpb.FeatureMonitor(name=name, kind=kind)  # type: ignore[arg-type]
            for window, length in WINDOWS.items():
                sketch = merged[window].get((kind, name)) or ColumnSketch(name, kind)
                drift = basis.judge(sketch)
                first, _ = self.store.span(length, now)
                feature.windows.append(drift.to_proto(window, _ns(first), _ns(now), basis.limits(name)))
                if window == POLICY_WINDOW and drift.breached:
                    monitor.drifted_features.append(name)
            psi_history, null_history = self.history(basis, (kind, name), now)
            feature.psi_history.extend(psi_history)
            feature.null_rate_history.extend(null_history)
            monitor.features.append(feature)
        return monitor

    def history(self, basis: VersionBasis, key: SketchKey, now: float) -> tuple[list[float], list[float]]:
        """PSI (NaN when unjudged) and null rate (NaN when empty) of each 5-minute bucket of the last day."""
        buckets = self.store.buckets(basis.model, basis.version, key)
        first, last = self.store.span(DAY_S, now)
        psi: list[float] = []
        nulls: list[float] = []
        with self._lock:
            for start in range(first, last + BUCKET_S, BUCKET_S):
                sketch = buckets.get(start)
                if sketch is None:
                    psi.append(math.nan)
                    nulls.append(math.nan)
                    continue
                slot = (basis.model, basis.version, key[0], key[1], start)
                cached = self._history.get(slot)
                if cached is None or cached[0] is not sketch:  # the store replaces a bucket it changes
                    drift = basis.judge(sketch)
                    value = drift.psi if drift.judged and drift.psi is not None else math.nan
                    cached = self._history[slot] = (sketch, value, drift.null_rate if sketch.count else math.nan)
                psi.append(cached[1])
                nulls.append(cached[2])
            for slot in [s for s in self._history if s[4] < first]:
                del self._history[slot]
        return psi, nulls
