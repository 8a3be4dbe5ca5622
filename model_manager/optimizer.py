"""Optimising a registered ONNX version: quantise it to INT8, measure it against its parent on the backtest dataset of
the model's spec, refuse it when its accuracy loss exceeds the spec's budget, else register it as a new version
whose lineage names the parent and whose report holds the deltas.

It runs in the manager, next to the artifacts, the backtest dataset and the budget: a client cannot skip the
budget, and needs no ONNX tooling of its own.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

from chassis.errors import FailedPrecondition, InvalidArgument
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager import backtest, optimization, schema
from model_manager.artifacts import ArtifactStore
from model_manager.backtest import BacktestError
from model_manager.optimization import Budget
from model_manager.quantize import QuantizationError, quantize_int8
from model_manager.records import Lineage, VersionRecord, VersionSpec
from model_manager.registry import Registry
from model_manager.rollout_store import RolloutStore
from model_manager.uploads import VersionUploads

DEFAULT_CALIBRATION_ROWS = 1000
MAX_CALIBRATION_ROWS = 100_000
DEFAULT_TIMING_RUNS = 400
METHOD_LABELS = {
    pb.OPTIMIZATION_METHOD_INT8_DYNAMIC: "int8-dynamic",
    pb.OPTIMIZATION_METHOD_INT8_STATIC: "int8-static",
}
# The backtest gate of a model's spec (its deployment's gates, else the manager's default gates); None when none.
SpecGate = Callable[[str], rpb.BacktestGate | None]


def spec_gate(deployments: RolloutStore, defaults: rpb.PromotionGates) -> SpecGate:
    """The backtest gate of a model's spec: its deployment's (gates set but empty mean the manager's, as on apply),
    else the manager's default gates'; None when neither has one."""

    def gate(model_name: str) -> rpb.BacktestGate | None:
        stored = deployments.deployment(model_name)
        gates = defaults
        if stored is not None:
            deployment = pb.Deployment.FromString(stored.spec)
            if deployment.gates.ByteSize():
                gates = deployment.gates
        return gates.backtest if gates.HasField("backtest") else None

    return gate


@dataclass(frozen=True)
class OptimizeRequest:
    """An optimisation asked for."""

    model_name: str
    version: int
    method: pb.OptimizationMethod.ValueType
    calibration_uri: str = ""
    calibration_rows: int = 0
    dry_run: bool = False
    reason: str = ""

    def checked(self) -> OptimizeRequest:
        """The request with its defaults; INVALID_ARGUMENT naming the field that is wrong."""
        schema.model_name("model_name", self.model_name)
        schema.version_number("version", self.version)
        schema.text("reason", self.reason, schema.MAX_TEXT)
        if self.method not in METHOD_LABELS:
            raise InvalidArgument(f"method: expected INT8_DYNAMIC or INT8_STATIC, got {self.method}")
        static = self.method == pb.OPTIMIZATION_METHOD_INT8_STATIC
        if static and not self.calibration_uri:
            raise InvalidArgument("calibration_uri: INT8_STATIC needs a Parquet sample of the model's features")
        if not static and (self.calibration_uri or self.calibration_rows):
            raise InvalidArgument("calibration_uri: only INT8_STATIC calibrates; INT8_DYNAMIC takes no sample")
        if not 0 <= self.calibration_rows <= MAX_CALIBRATION_ROWS:
            raise InvalidArgument(f"calibration_rows: expected 0..{MAX_CALIBRATION_ROWS}, got {self.calibration_rows}")
        rows = self.calibration_rows or (DEFAULT_CALIBRATION_ROWS if static else 0)
        return replace(self, calibration_rows=rows)


@dataclass(frozen=True)
class Optimized:
    """What an optimisation measured, and the version it registered (None on a dry run)."""

    report: pb.OptimizationReport
    version: VersionRecord | None


async def _one_chunk(artifact: bytes) -> AsyncIterator[bytes]:
    yield artifact


class Optimizer:
    """Optimises registered versions into new versions, judged by the budget of the model's spec."""

    def __init__(
        self,
        registry: Registry,
        store: ArtifactStore,
        uploads: VersionUploads,
        spec_gate: SpecGate,
        timing_runs: int = DEFAULT_TIMING_RUNS,
    ) -> None:
        self.registry = registry
        self.store = store
        self.uploads = uploads
        self.spec_gate = spec_gate
        self.timing_runs = timing_runs

    async def optimize(self, request: OptimizeRequest, identity: str) -> Optimized:
        """Quantise, measure and judge; register unless a dry run. FAILED_PRECONDITION when the version cannot be
        optimised or the loss exceeds the budget (nothing is registered then)."""
        request = request.checked()
        parent = await asyncio.to_thread(self.registry.get_version, request.model_name, request.version)
        if parent.format != "onnx":
            raise FailedPrecondition(f"version: {request.model_name} v{parent.version} is {parent.format}, not onnx")
        gate = await asyncio.to_thread(self.spec_gate, request.model_name)
        if gate is None:
            raise FailedPrecondition(
                f"backtest: {request.model_name} has no backtest gate in its deployment or the manager's default "
                "gates, so there is no dataset to measure the optimised model on"
            )
        budget = Budget.of(gate)
        artifact, report = await asyncio.to_thread(self._measured, request, parent, gate, budget)
        if not optimization.within_budget(report):
            raise FailedPrecondition(
                f"{optimization.BUDGET_FIELD}: {report.metric} of the optimised model is {report.accuracy_loss:.6g} "
                f"worse than v{parent.version}'s on {report.rows} rows of {report.dataset_uri}; the budget is "
                f"{report.accuracy_loss_budget:.6g}. Nothing was registered"
            )
        if request.dry_run:
            return Optimized(report, None)
        spec = self._spec(parent, artifact, report)
        reason = request.reason or f"{METHOD_LABELS[request.method]} of v{parent.version}"
        record = await self.uploads.upload(spec, _one_chunk(artifact), identity, reason)
        return Optimized(report, record)

    def _measured(
        self, request: OptimizeRequest, parent: VersionRecord, gate: rpb.BacktestGate, budget: Budget
    ) -> tuple[bytes, pb.OptimizationReport]:
        """Blocking: the optimised artifact and its report."""
        signature = parent.signature
        try:
            dataset = backtest.load_dataset(gate.dataset_uri, gate.dataset_sha256.lower())
            source = self.store.read(parent.sha256)
            calibration = None
            if request.method == pb.OPTIMIZATION_METHOD_INT8_STATIC:
                calibration = optimization.calibration_rows(
                    request.calibration_uri, signature, request.calibration_rows
                )
            artifact = quantize_int8(source, signature.feature_input, calibration)
            report = optimization.measure(source, artifact, signature, gate, dataset, budget, self.timing_runs)
        except (BacktestError, QuantizationError) as err:
            raise FailedPrecondition(str(err)) from err
        report.method = request.method
        report.parent_version = parent.version
        report.calibration_rows = 0 if calibration is None else int(calibration.shape[0])
        return artifact, report

    @staticmethod
    def _spec(parent: VersionRecord, artifact: bytes, report: pb.OptimizationReport) -> VersionSpec:
        """The optimised version: the parent's signature, statistics and hints; its lineage names the parent; its
        report holds the backtest metrics and the deltas."""
        method = METHOD_LABELS[report.method]
        evaluation = rpb.TrainingReport(
            metrics=report.metrics,
            feature_importance=parent.report.feature_importance,
            parameters={**parent.report.parameters, **optimization.deltas(report)},
            training_data_uri=parent.report.training_data_uri,
            evaluation_dataset_uri=report.dataset_uri,
            evaluation_dataset_sha256=report.dataset_sha256,
        )
        if parent.report.HasField("trained_at"):
            evaluation.trained_at.CopyFrom(parent.report.trained_at)
        hints = rpb.BackendHints()
        hints.CopyFrom(parent.backend_hints)
        if hints.expected_memory_bytes and report.parent_size_bytes:
            # The weights are most of a model's memory: they shrink as the artifact does.
            shrunk = hints.expected_memory_bytes * len(artifact) // report.parent_size_bytes
            hints.expected_memory_bytes = max(1, shrunk)
        lineage = parent.lineage
        return VersionSpec(
            model_name=parent.model_name,
            format="onnx",
            expected_sha256=hashlib.sha256(artifact).hexdigest(),
            expected_size_bytes=len(artifact),
            framework=parent.framework,
            description=f"{method} of v{parent.version}",
            source_run=parent.source_run,
            labels={**parent.labels, "optimization": method},
            lineage=Lineage(lineage.code_commit, lineage.dataset_uri, lineage.dataset_sha256, parent.version),
            signature=parent.signature,
            training_statistics=parent.training_statistics,
            report=evaluation,
            backend_hints=hints,
            drift_policy=parent.drift_policy,
        )
