"""`fresco models optimize`: an INT8 copy of a version, measured against it on the backtest dataset by the model
manager and registered as a new version when its accuracy loss is within the budget of the model's spec."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.cli_manager import ServiceOption, TokenFileOption, connect

console = Console()

# Quantising, scoring the backtest dataset twice and timing both models takes a while on a big model.
OPTIMIZE_TIMEOUT_S = 900.0


def _ratio(value: float, parent: float) -> str:
    return f"{value / parent:.3f}" if parent else "-"


def report_table(report: pb.OptimizationReport) -> Table:
    """The optimised model against its parent: size, time per row, the judged metric and the budget."""
    table = Table(title=f"{pb.OptimizationMethod.Name(report.method)} of v{report.parent_version}")
    for column in ("", "parent", "optimised", "ratio / delta"):
        table.add_column(column, no_wrap=True)
    table.add_row(
        "size bytes",
        str(report.parent_size_bytes),
        str(report.size_bytes),
        _ratio(report.size_bytes, report.parent_size_bytes),
    )
    table.add_row(
        "latency µs/row (median)",
        f"{report.parent_latency_us:.1f}",
        f"{report.latency_us:.1f}",
        _ratio(report.latency_us, report.parent_latency_us),
    )
    table.add_row(
        "CPU µs/row (median)",
        f"{report.parent_cpu_us:.1f}",
        f"{report.cpu_us:.1f}",
        _ratio(report.cpu_us, report.parent_cpu_us),
    )
    metric = report.metric
    table.add_row(
        escape(metric),
        f"{report.parent_metrics[metric]:.6f}",
        f"{report.metrics[metric]:.6f}",
        f"loss {report.accuracy_loss:+.6f} (budget {report.accuracy_loss_budget:g})",
    )
    return table


def _calibration_uri(calibration: str) -> str:
    """A local file as an absolute path (the manager reads it; same machine or shared disk), a URI as it is."""
    if "://" in calibration:
        return calibration
    path = Path(calibration)
    if not path.is_file():
        raise typer.BadParameter(f"no such file: {calibration}", param_hint="--calibration")
    return str(path.resolve())


def optimize(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(min=1, help="Version to optimise (the parent).")],
    service: ServiceOption,
    token_file: TokenFileOption = None,
    int8: Annotated[bool, typer.Option("--int8", help="Quantise to INT8 (ONNX Runtime); required.")] = False,
    static: Annotated[
        bool, typer.Option("--static", help="Static quantisation with --calibration rows; dynamic without.")
    ] = False,
    calibration: Annotated[
        str | None,
        typer.Option(help="Parquet sample of the model's feature columns for --static (a path or an fsspec URI)."),
    ] = None,
    calibration_rows: Annotated[int, typer.Option(min=0, help="Most calibration rows used; 0 means 1000.")] = 0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Measure and judge without registering.")] = False,
    reason: Annotated[str, typer.Option(help="Why, for the audit log.")] = "",
) -> None:
    """Quantise a version to INT8 in the model manager, measure size, latency and accuracy against it on the
    backtest dataset of the model's spec, and register the result as a new version whose lineage names the parent.
    Refused (exit 1, nothing registered) when the accuracy loss exceeds the spec's backtest.max_optimization_loss."""
    if not int8:
        raise typer.BadParameter("the only optimisation is INT8 quantisation: give --int8", param_hint="--int8")
    if static != (calibration is not None):
        raise typer.BadParameter("--static needs --calibration FILE.parquet, and only --static takes one")
    request = pb.OptimizeModelVersionRequest(
        model_name=name,
        version=version,
        method=pb.OPTIMIZATION_METHOD_INT8_STATIC if static else pb.OPTIMIZATION_METHOD_INT8_DYNAMIC,
        calibration_uri=_calibration_uri(calibration) if calibration is not None else "",
        calibration_rows=calibration_rows,
        dry_run=dry_run,
        reason=reason,
    )
    with connect(service, token_file, "optimize") as m:
        response = m.stub.OptimizeModelVersion(request, timeout=OPTIMIZE_TIMEOUT_S, metadata=m.metadata)
    report = response.report
    console.print(report_table(report))
    console.print(
        f"scored {report.rows} rows of {escape(report.dataset_uri)} (sha256 {report.dataset_sha256}); "
        f"largest score difference {report.max_abs_score_diff:.3g}",
        highlight=False,
    )
    if response.HasField("model_version"):
        registered = response.model_version
        console.print(
            f"registered {escape(registered.model_name)} v{registered.version} "
            f"(parent v{registered.lineage.parent_version}, sha256 {registered.sha256})",
            highlight=False,
        )
    else:
        console.print("dry run: within the budget, nothing registered")
