"""A model's live monitor: each version's drift windows and history from the drift monitor, the stage from the
registry, and online-offline parity from the feature service when one is configured (answered without it, and
saying so, when it cannot be reached)."""

from __future__ import annotations

import asyncio
import threading

from grpc import aio

from chassis.errors import NotFound
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import monitoring_pb2 as mpb
from model_manager import messages
from model_manager.drift_monitor import DriftMonitor, VersionBasis
from model_manager.gate_schema import FeatureCatalog
from model_manager.monitor_store import DAY_S, MonitorStore
from model_manager.registry import Registry
from model_manager.window_sketches import FEATURE


class ModelMonitors:
    """Answers GetModelMonitor; keeps each version's basis (training statistics, policy), as versions never change."""

    def __init__(self, registry: Registry, store: MonitorStore, catalog: FeatureCatalog | None = None) -> None:
        self.registry = registry
        self.store = store
        self.drift = DriftMonitor(store)
        self.catalog = catalog
        self._lock = threading.Lock()
        self._bases: dict[tuple[str, int], VersionBasis] = {}

    def basis(self, model: str, version: int) -> VersionBasis:
        """Blocking: a version's basis, read once; NOT_FOUND for an unknown version."""
        key = (model, version)
        with self._lock:
            known = self._bases.get(key)
        if known is not None:
            return known
        basis = VersionBasis.of(self.registry.get_version(model, version))
        with self._lock:
            self._bases[key] = basis
        return basis

    def basis_or_none(self, model: str, version: int) -> VersionBasis | None:
        """Blocking: a version's basis, None when the registry has no such version."""
        try:
            return self.basis(model, version)
        except NotFound:
            return None

    def _versions(self, model: str, versions: list[int]) -> list[mpb.VersionMonitor]:
        """Blocking: each version's monitor, newest first (every version that reported in the last day if none)."""
        self.registry.get_model(model)  # NOT_FOUND for an unknown model
        chosen = sorted(set(versions), reverse=True) or self.store.versions(model, self.drift.clock() - DAY_S)
        out = []
        for number in chosen:
            record = self.registry.get_version(model, number)
            basis = self.basis(model, number)
            out.append(self.drift.version_monitor(basis, messages.stage_value(record.stage)))
        return out

    async def answer(self, model: str, versions: list[int]) -> pb.GetModelMonitorResponse:
        """The GetModelMonitor answer."""
        monitors = await asyncio.to_thread(self._versions, model, versions)
        response = pb.GetModelMonitorResponse(versions=monitors)
        refs = sorted({f.name for m in monitors for f in m.features if f.kind == FEATURE and ":" in f.name})
        if not refs:
            return response
        if self.catalog is None:
            response.notes.append(
                "parity: no feature service configured (--feature-service-address); shown without parity"
            )
            return response
        try:
            found = {p.feature_ref: p for p in await self.catalog.parity()}
        except aio.AioRpcError as err:
            response.notes.append(
                f"parity: feature service {self.catalog.address} answered {err.code().name} "
                f"({err.details()}); shown without parity"
            )
            return response
        for monitor in response.versions:
            for feature in monitor.features:
                if feature.kind == FEATURE and feature.name in found:
                    feature.parity.CopyFrom(found[feature.name])
        return response
