"""`fresco models monitor NAME`: a model's live drift, null rates and parity per feature and score."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.cli_manager import TIMEOUT_S, ServiceOption, TokenFileOption, connect
from fresco.monitor_view import monitor_view
from fresco.quality_view import quality_view

console = Console()


def monitor(
    name: Annotated[str, typer.Argument(help="The model.")],
    service: ServiceOption,
    token_file: TokenFileOption = None,
    version: Annotated[
        list[int] | None,
        typer.Option(
            "--version",
            min=1,
            help="Only this version (repeatable); default: every version that reported in the last day.",
        ),
    ] = None,
) -> None:
    """Live drift (PSI, KS, JS over 5m, 1h, 1d), null rate against training, online-offline parity and sparklines of
    the last day, per feature and score of each version, breaches in red; then the prediction quality late labels
    give per version and window."""
    with connect(service, token_file, "monitor") as m:
        request = pb.GetModelMonitorRequest(model_name=name, versions=version or [])
        response = m.stub.GetModelMonitor(request, timeout=TIMEOUT_S, metadata=m.metadata)
        asked = pb.GetPredictionQualityRequest(model_name=name, versions=version or [])
        quality = m.stub.GetPredictionQuality(asked, timeout=TIMEOUT_S, metadata=m.metadata)
    console.print(monitor_view(name, response))
    console.print(quality_view(name, quality))
