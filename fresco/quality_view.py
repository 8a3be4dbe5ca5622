"""Prediction quality from late labels as terminal tables: one row per version and window."""

from __future__ import annotations

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import registry_pb2 as rpb

# The metrics shown, in order, with how each is printed; a task's missing metrics show as a dash.
COLUMNS = (("accuracy", "{:.3f}"), ("auc", "{:.3f}"), ("logloss", "{:.3f}"), ("mae", "{:.4g}"), ("rmse", "{:.4g}"))


TASKS: dict[int, str] = {rpb.MODEL_TASK_BINARY_CLASSIFICATION: "binary", rpb.MODEL_TASK_REGRESSION: "regression"}


def _task(task: int) -> str:
    return TASKS.get(task, "—")


def quality_view(model: str, response: pb.GetPredictionQualityResponse) -> RenderableType:
    """Predictions kept, labels joined, the task's metrics, expected calibration error and mean entropy."""
    if not response.versions:
        return Text(f"{model}: no predictions kept for late labels", style="yellow")
    table = Table(title=f"{model}: prediction quality from late labels", title_justify="left")
    for header in ("version", "window", "task", "predictions", "labelled", *(name for name, _ in COLUMNS), "ECE",
                   "entropy"):  # fmt: skip
        table.add_column(header, justify="left" if header in ("version", "window", "task") else "right")
    for version in response.versions:
        for window in version.windows:
            metrics = [fmt.format(window.metrics[name]) if name in window.metrics else "—" for name, fmt in COLUMNS]
            ece = (
                f"{window.calibration.expected_calibration_error:.3f}"
                if window.HasField("calibration") and window.calibration.bins
                else "—"
            )
            entropy = f"{window.mean_entropy:.3f}" if window.HasField("mean_entropy") else "—"
            table.add_row(
                f"v{version.version}", window.window, _task(window.task), str(window.predictions),
                str(window.labelled), *metrics, ece, entropy,
            )  # fmt: skip
    return table
