"""`fresco models report NAME VERSION --html FILE`: a version's deployment-readiness review as one HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fresco.cli_manager import ServiceOption, TokenFileOption, connect
from fresco.model_report import collect
from fresco.model_report_html import render

console = Console()


def report(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(min=1, help="Version number.")],
    html: Annotated[Path, typer.Option(dir_okay=False, help="Where to write the self-contained HTML page.")],
    service: ServiceOption,
    token_file: TokenFileOption = None,
) -> None:
    """Write a version's model report: training data quality, feature importance, metrics, calibration, drift since
    release and the family's safety score; what a service does not have is shown as missing."""
    with connect(service, token_file, "report") as manager:
        gathered = collect(manager, name, version)
    page = render(gathered)
    html.parent.mkdir(parents=True, exist_ok=True)
    html.write_text(page, encoding="utf-8")
    missing = [x.missing for x in (gathered.quality, gathered.monitor, gathered.safety) if x.missing]
    console.print(f"wrote the report of {escape(name)} version {version} to {escape(str(html))}")
    for line in missing:
        console.print(f"  missing: {escape(line)}")
