"""Running the promotion gates of one version: schema, backtest and latency, each result reported as it lands."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from chassis.errors import FrescoError
from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager import backtest
from model_manager.artifacts import ArtifactStore
from model_manager.backtest import BacktestError, DatasetMismatch
from model_manager.drift_monitor import VersionBasis
from model_manager.gate_drift import drift_gate
from model_manager.gate_latency import ChannelFactory, PredictorFleet, latency_gate
from model_manager.gate_results import check, error
from model_manager.gate_schema import FeatureCatalog, check_artifact, check_feature_refs, check_outputs
from model_manager.monitors import ModelMonitors
from model_manager.records import VersionRecord
from model_manager.registry import Registry
from model_manager.thresholds import DEFAULT_MIN_SLICE_ROWS, Baseline, check_thresholds, thresholds_of

BACKTEST = rpb.GATE_TYPE_BACKTEST
Progress = Callable[[list[rpb.GateResult]], Awaitable[None]]
log = logging.getLogger(__name__)


def _unused(model: str, version: int) -> bool:
    return False


@dataclass
class GateRunner:
    """What the gates run against: the registry and its artifacts, the feature service and the predictor fleet."""

    registry: Registry
    store: ArtifactStore
    channels: ChannelFactory
    catalog: FeatureCatalog | None = None
    fleet: PredictorFleet | None = None
    latency_samples: int = 200
    latency_warmup: int = 20
    # Whether a route or rollout uses a version: then the copy the latency gate loaded stays when the gates end.
    in_use: Callable[[str, int], bool] = _unused
    # The live sketches the drift gate judges (none: the drift gate reports an error).
    monitors: ModelMonitors | None = None
    _measured: set[tuple[str, int]] = field(default_factory=set)

    async def run(self, version: VersionRecord, gates: rpb.PromotionGates, progress: Progress) -> list[rpb.GateResult]:
        """Every configured gate in turn; `progress` sees the results so far after each gate."""
        production = await asyncio.to_thread(self._production, version)
        results: list[rpb.GateResult] = []
        if gates.HasField("schema"):
            results += await self._schema(gates.schema, version, production)
            await progress(results)
        if gates.HasField("backtest"):
            results += await asyncio.to_thread(self._backtest, gates.backtest, version, production)
            await progress(results)
        if gates.HasField("latency"):
            if self.fleet is not None:
                self._measured.add((version.model_name, version.version))
            results.append(
                await latency_gate(
                    gates.latency,
                    version.model_name,
                    version.version,
                    version.signature,
                    self.fleet,
                    self.channels,
                    self.latency_samples,
                    self.latency_warmup,
                )
            )
            await progress(results)
        if gates.HasField("drift"):
            basis = VersionBasis.of(version)
            results.append(await asyncio.to_thread(drift_gate, gates.drift, basis, self.monitors))
            await progress(results)
        return results

    async def release_measured(self, model: str, version: int) -> bool:
        """Unload what the latency gate loaded of a version that will not serve (rejected, or measured in a dry
        run), unless a route or rollout uses it; whether it was released."""
        key = (model, version)
        if key not in self._measured or self.fleet is None:
            return False
        self._measured.discard(key)
        if self.in_use(model, version):
            return False
        try:
            await self.fleet.release(model, version)
        except FrescoError as err:  # the fleet retries unloads in the background; the verdict stands
            log.warning("releasing %s v%d after its gates failed: %s", model, version, err)
        return True

    def _production(self, version: VersionRecord) -> VersionRecord | None:
        number = self.registry.get_model(version.model_name).production_version
        if not number or number == version.version:
            return None
        return self.registry.get_version(version.model_name, number)

    async def _schema(
        self, gate: rpb.SchemaGate, version: VersionRecord, production: VersionRecord | None
    ) -> list[rpb.GateResult]:
        artifact = await asyncio.to_thread(self.store.read, version.sha256)
        results = [await asyncio.to_thread(check_artifact, artifact, version.format, version.signature)]
        if gate.check_feature_refs:
            results.append(await check_feature_refs(version.signature, self.catalog))
        if gate.require_output_compatibility:
            results.append(
                check_outputs(
                    version.signature,
                    production.signature if production else None,
                    production.version if production else 0,
                )
            )
        return results

    def _scores(self, gate: rpb.BacktestGate, version: VersionRecord, dataset: backtest.Dataset) -> backtest.Scored:
        labels = backtest.labels_of(dataset.table, gate.label_column)
        slices = backtest.slice_values(dataset.table, gate.slice_column) if gate.slice_column else None
        features = backtest.feature_matrix(dataset.table, version.signature)
        scores = backtest.score(self.store.read(version.sha256), version.signature, features, gate.score_output)
        return backtest.evaluate_scores(labels, scores, slices)

    def _backtest(
        self, gate: rpb.BacktestGate, version: VersionRecord, production: VersionRecord | None
    ) -> list[rpb.GateResult]:
        """Blocking: read the dataset, score the candidate and production on it, check every threshold."""
        try:
            dataset = backtest.load_dataset(gate.dataset_uri, gate.dataset_sha256.lower())
        except DatasetMismatch as err:
            return [check("backtest.dataset_sha256", BACKTEST, False, str(err))]
        except BacktestError as err:
            return [error("backtest", BACKTEST, str(err))]
        try:
            candidate = self._scores(gate, version, dataset)
        except BacktestError as err:
            return [error("backtest", BACKTEST, str(err))]
        baseline = Baseline(0)
        if production is not None:
            try:
                baseline = Baseline(production.version, self._scores(gate, production, dataset))
            except BacktestError as err:
                baseline = Baseline(production.version, None, str(err))
        rows = candidate.evaluation.rows
        compared = f", compared with production v{baseline.version}" if baseline.version else ""
        head = check(
            "backtest.dataset",
            BACKTEST,
            True,
            f"scored {rows} rows of {dataset.uri} (sha256 {dataset.sha256}){compared}",
            float(rows),
        )
        head.backtest.CopyFrom(backtest.report(dataset, candidate, baseline.scored, baseline.version))
        limits = thresholds_of(gate)
        return [head, *check_thresholds(limits, candidate, baseline, gate.min_slice_rows or DEFAULT_MIN_SLICE_ROWS)]
