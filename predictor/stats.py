"""Cumulative inference statistics per model version, as ModelStatistics reports them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from predictor.batcher import Execution


@dataclass
class Duration:
    """A count and the total nanoseconds spent."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class BatchFigures:
    """Figures for executions of one batch size."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class VersionStats:
    """Everything ModelStatistics says of one version."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, BatchFigures] = field(default_factory=dict)

    def record_execution(self, execution: Execution) -> None:
        """One model execution: its input preparation, model run and output extraction. As in
        Triton, every request of the batch is charged the batch's whole durations (so the inference
        figures are per request, and their averages are what perf_analyzer shows per request), while
        the batch figures count the execution once."""
        self.execution_count += 1
        self.inference_count += execution.rows
        input_ns, infer_ns = execution.input_ns, execution.infer_ns
        output_ns = max(0, execution.compute_ns - input_ns - infer_ns)
        requests = max(1, len(execution.requests))
        self.compute_input.add(input_ns * requests, requests)
        self.compute_infer.add(infer_ns * requests, requests)
        self.compute_output.add(output_ns * requests, requests)
        figures = self.batches.setdefault(execution.rows, BatchFigures())
        figures.compute_input.add(input_ns)
        figures.compute_infer.add(infer_ns)
        figures.compute_output.add(output_ns)
        self.last_inference_ms = time.time_ns() // 1_000_000

    def record_request(self, ok: bool, total_ns: int) -> None:
        """One request finished, successfully or not."""
        (self.success if ok else self.fail).add(total_ns)
