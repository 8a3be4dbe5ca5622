"""An optimised model measured against its parent: size, time per row and accuracy on the backtest dataset, and
the accuracy budget it is judged by.

Blocking and CPU-heavy: callers run it in a worker thread.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from chassis.errors import FailedPrecondition
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager import backtest
from model_manager.backtest import BacktestError, Dataset
from model_manager.thresholds import thresholds_of

TIMED_ROWS = 64
WARMUP_RUNS = 20
BUDGET_FIELD = "backtest.max_optimization_loss"


@dataclass(frozen=True)
class Budget:
    """The metric an optimised version is judged on, its direction and the largest loss accepted, in metric units."""

    metric: str
    higher_is_better: bool
    max_loss: float

    @classmethod
    def of(cls, gate: rpb.BacktestGate) -> Budget:
        """The budget of a backtest gate; FAILED_PRECONDITION when the gate sets no budget or no metric."""
        if not gate.HasField("max_optimization_loss"):
            raise FailedPrecondition(
                f"{BUDGET_FIELD}: the model's backtest gate sets no accuracy budget, so no optimised version of it "
                "can be judged; set max_optimization_loss (metric units) in its deployment's gates"
            )
        limits = thresholds_of(gate)
        if not limits:
            raise FailedPrecondition("backtest.metric: the backtest gate names no metric to judge an optimisation by")
        budget = float(gate.max_optimization_loss)
        if not math.isfinite(budget) or budget < 0:
            raise FailedPrecondition(f"{BUDGET_FIELD}: expected a finite loss >= 0, got {budget}")
        return cls(limits[0].metric, limits[0].higher_is_better, budget)

    def loss(self, parent: float, optimised: float) -> float:
        """How much worse the optimised value is than the parent's (negative when better)."""
        return parent - optimised if self.higher_is_better else optimised - parent


@dataclass(frozen=True)
class Timing:
    """Median time per row of the parent and the optimised model, wall clock and the calling thread's CPU."""

    parent_wall_us: float
    wall_us: float
    parent_cpu_us: float
    cpu_us: float


def _session(artifact: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the work runs on the calling thread, so its CPU clock measures it
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        return ort.InferenceSession(artifact, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for a bad graph
        raise BacktestError(f"artifact: ONNX Runtime cannot load the model: {str(err)[:300]}") from err


def time_rows(parent: bytes, optimised: bytes, input_name: str, rows: npt.NDArray[np.generic], runs: int) -> Timing:
    """One-row runs of both models, interleaved so that other load on the machine falls on both alike."""
    sessions = (_session(parent), _session(optimised))
    sample = rows[:TIMED_ROWS]
    if sample.shape[0] == 0:
        raise BacktestError("dataset_uri: no rows to time the models on")
    for session in sessions:
        for i in range(WARMUP_RUNS):
            session.run(None, {input_name: sample[i % sample.shape[0] : i % sample.shape[0] + 1]})
    wall: tuple[list[float], list[float]] = ([], [])
    cpu: tuple[list[float], list[float]] = ([], [])
    for i in range(runs):
        row = {input_name: sample[i % sample.shape[0] : i % sample.shape[0] + 1]}
        for which in (0, 1) if i % 2 == 0 else (1, 0):
            wall_start, cpu_start = time.perf_counter_ns(), time.thread_time_ns()
            sessions[which].run(None, row)
            cpu[which].append((time.thread_time_ns() - cpu_start) / 1e3)
            wall[which].append((time.perf_counter_ns() - wall_start) / 1e3)
    return Timing(
        statistics.median(wall[0]), statistics.median(wall[1]), statistics.median(cpu[0]), statistics.median(cpu[1])
    )


def calibration_rows(uri: str, signature: rpb.ModelSignature, limit: int) -> npt.NDArray[np.generic]:
    """Up to `limit` rows of the model's feature input from a Parquet sample."""
    sample = backtest.load_dataset(uri)
    rows = backtest.feature_matrix(sample.table.slice(0, limit), signature)
    if rows.shape[0] == 0:
        raise BacktestError(f"calibration_uri: {uri} holds no rows")
    return rows


def measure(
    parent: bytes,
    optimised: bytes,
    signature: rpb.ModelSignature,
    gate: rpb.BacktestGate,
    dataset: Dataset,
    budget: Budget,
    timing_runs: int,
) -> pb.OptimizationReport:
    """Both models scored on the backtest dataset and timed on its rows; the report without method or versions."""
    labels = backtest.labels_of(dataset.table, gate.label_column)
    features = backtest.feature_matrix(dataset.table, signature)
    before = backtest.score(parent, signature, features, gate.score_output)
    after = backtest.score(optimised, signature, features, gate.score_output)
    parent_metrics = backtest.evaluate_scores(labels, before, None).evaluation.metrics
    metrics = backtest.evaluate_scores(labels, after, None).evaluation.metrics
    if budget.metric not in parent_metrics or budget.metric not in metrics:
        raise BacktestError(f"backtest.metric: {budget.metric!r} cannot be computed on this dataset and model")
    timing = time_rows(parent, optimised, signature.feature_input, features, timing_runs)
    return pb.OptimizationReport(
        parent_size_bytes=len(parent),
        size_bytes=len(optimised),
        parent_latency_us=timing.parent_wall_us,
        latency_us=timing.wall_us,
        parent_cpu_us=timing.parent_cpu_us,
        cpu_us=timing.cpu_us,
        metric=budget.metric,
        parent_metrics=parent_metrics,
        metrics=metrics,
        accuracy_loss=budget.loss(parent_metrics[budget.metric], metrics[budget.metric]),
        accuracy_loss_budget=budget.max_loss,
        dataset_uri=dataset.uri,
        dataset_sha256=dataset.sha256,
        rows=int(labels.size),
        max_abs_score_diff=float(np.max(np.abs(before - after))) if before.size else 0.0,
    )


def within_budget(report: pb.OptimizationReport) -> bool:
    """Whether the accuracy loss is within the budget (a NaN loss never is)."""
    return report.accuracy_loss <= report.accuracy_loss_budget


def deltas(report: pb.OptimizationReport) -> dict[str, str]:
    """The report as the optimised version's report parameters, `optimization.*`."""
    size_ratio = report.size_bytes / report.parent_size_bytes if report.parent_size_bytes else 0.0
    latency_ratio = report.latency_us / report.parent_latency_us if report.parent_latency_us else 0.0
    cpu_ratio = report.cpu_us / report.parent_cpu_us if report.parent_cpu_us else 0.0
    return {
        "optimization.method": pb.OptimizationMethod.Name(report.method),
        "optimization.parent_version": str(report.parent_version),
        "optimization.size_ratio": f"{size_ratio:.4f}",
        "optimization.latency_ratio": f"{latency_ratio:.4f}",
        "optimization.cpu_ratio": f"{cpu_ratio:.4f}",
        "optimization.metric": report.metric,
        "optimization.accuracy_loss": f"{report.accuracy_loss:.6g}",
        "optimization.accuracy_loss_budget": f"{report.accuracy_loss_budget:.6g}",
        "optimization.max_abs_score_diff": f"{report.max_abs_score_diff:.6g}",
        "optimization.calibration_rows": str(report.calibration_rows),
    }
