"""`fresco features`: load offline data into the online feature store and show what it holds."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import grpc
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from chassis.errors import FrescoError
from chassis.server import channel_options
from chassis.settings import DEFAULT_MAX_MESSAGE_BYTES
from fresco.api.features.v1 import feature_service_pb2 as pb
from fresco.api.features.v1 import feature_service_pb2_grpc as pb_grpc
from fresco.api.features.v1 import statistics_pb2 as spb
from fresco.credentials import ClientSecurity

app = typer.Typer(help="The feature store: materialise offline data, inspect statistics.", no_args_is_help=True)
console = Console()
errors = Console(stderr=True)

_FORMATS = {None: pb.FILE_FORMAT_UNSPECIFIED, "parquet": pb.FILE_FORMAT_PARQUET, "csv": pb.FILE_FORMAT_CSV}
_VIOLATIONS = {value: name.removeprefix("VIOLATION_CODE_") for name, value in pb.ViolationCode.items()}


@app.callback()
def features() -> None:
    """The feature store: materialise offline data, inspect statistics."""


def _pairs(option: str, items: list[str]) -> dict[str, str]:
    """NAME=COLUMN options as a mapping."""
    out = {}
    for item in items:
        name, sep, column = item.partition("=")
        if not sep or not name or not column:
            raise typer.BadParameter(f"expected NAME=COLUMN, got {item!r}", param_hint=option)
        out[name] = column
    return out


def _timestamp(value: datetime | None) -> Any:
    if value is None:
        return None
    from google.protobuf.timestamp_pb2 import Timestamp

    stamp = Timestamp()
    stamp.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
    return stamp


@app.command()
def materialize(
    view: Annotated[str, typer.Option(help="Feature view to load.")],
    source: Annotated[str, typer.Option(help="Parquet or CSV file: a path or file:// URI.")],
    definitions: Annotated[
        Path | None, typer.Option(help="Definitions YAML (default: FRESCO_FEATURE_SERVICE_DEFINITIONS, features.yaml).")
    ] = None,
    service: Annotated[
        str | None,
        typer.Option(help="host:port of a running feature service: load through its Materialize RPC, not in process."),
    ] = None,
    file_format: Annotated[
        Literal["parquet", "csv"] | None, typer.Option("--format", help="File format (default: from the extension).")
    ] = None,
    join_key_column: Annotated[
        list[str] | None, typer.Option(help="KEY=COLUMN: source column of a join key (default: same name); repeat.")
    ] = None,
    feature_column: Annotated[
        list[str] | None, typer.Option(help="FEATURE=COLUMN: source column of a feature (default: same name); repeat.")
    ] = None,
    event_timestamp_column: Annotated[str, typer.Option(help="Source column of event times.")] = "event_timestamp",
    start: Annotated[
        datetime | None, typer.Option(help="Skip rows with event times before this (UTC if naive).")
    ] = None,
    end: Annotated[datetime | None, typer.Option(help="Skip rows with event times at or after this.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Validate and compute statistics without writing.")] = False,
    backend: Annotated[
        Literal["sqlite", "redis+cassandra"] | None,
        typer.Option(help="In process: the online store (default: FRESCO_FEATURE_SERVICE_BACKEND, sqlite)."),
    ] = None,
    sqlite_path: Annotated[Path | None, typer.Option(help="In process with sqlite: the database file.")] = None,
    redis_url: Annotated[str | None, typer.Option(help="In process with redis+cassandra: the Redis URL.")] = None,
    cassandra_contact_point: Annotated[
        list[str] | None, typer.Option(help="In process: a Cassandra host; repeat.")
    ] = None,
    timeout_s: Annotated[float, typer.Option(help="With --service: deadline of the Materialize call.")] = 3600.0,
    token_file: Annotated[
        Path | None,
        typer.Option(
            envvar="FRESCO_TOKEN_FILE",
            help="With --service: file holding a bearer token with role deployer or admin (`fresco up` prints one). "
            "FRESCO_TOKEN may hold the token itself; FRESCO_TLS_CA_FILE, FRESCO_TLS_CERT_FILE and "
            "FRESCO_TLS_KEY_FILE turn on TLS and mTLS.",
        ),
    ] = None,
) -> None:
    """Load a file into the online store (the latest valid row per entity) and record its statistics."""
    request = pb.MaterializeRequest(
        feature_view=view,
        source_uri=source,
        format=_FORMATS[file_format],
        join_key_columns=_pairs("--join-key-column", join_key_column or []),
        feature_columns=_pairs("--feature-column", feature_column or []),
        event_timestamp_column=event_timestamp_column,
        start_time=_timestamp(start),
        end_time=_timestamp(end),
        dry_run=dry_run,
    )
    try:
        if service is not None:
            try:
                security = ClientSecurity.from_env(token_file)
            except (OSError, ValueError) as err:
                raise typer.BadParameter(str(err), param_hint="--token-file") from None
            response = _through_service(service, request, timeout_s, security)
        else:
            overrides: dict[str, Any] = {
                "definitions": definitions,
                "backend": backend,
                "sqlite_path": sqlite_path,
                "redis_url": redis_url,
                "cassandra_contact_points": cassandra_contact_point or None,
            }
            response = _in_process(request, {k: v for k, v in overrides.items() if v is not None})
    except FrescoError as err:
        errors.print(f"[red]materialize failed:[/red] {escape(str(err))}")
        raise typer.Exit(1) from None
    except grpc.RpcError as err:
        errors.print(f"[red]materialize failed:[/red] {err.code().name}: {escape(str(err.details()))}")
        raise typer.Exit(1) from None
    print_outcome(response, dry_run)


def _through_service(
    address: str, request: pb.MaterializeRequest, timeout_s: float, security: ClientSecurity
) -> pb.MaterializeResponse:
    """Call a running service's Materialize RPC, with a spinner (the RPC reports no progress)."""
    with (
        security.channel(address, options=channel_options(DEFAULT_MAX_MESSAGE_BYTES)) as channel,
        Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as progress,
    ):
        progress.add_task(f"materialising {request.feature_view} through {address}", total=None)
        response: pb.MaterializeResponse = pb_grpc.FeatureServiceStub(channel).Materialize(
            request, timeout=timeout_s, metadata=security.metadata()
        )
        return response


def _in_process(request: pb.MaterializeRequest, overrides: dict[str, Any]) -> pb.MaterializeResponse:
    """Run the service's Materializer here, against the stores the settings name, with a progress bar."""
    from feature_service.server import materialize_in_process
    from feature_service.settings import FeatureServiceSettings

    settings = FeatureServiceSettings(**overrides)
    columns = (TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        tasks: dict[str, Any] = {}

        def report(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(phase, total=total)
            progress.update(tasks[phase], completed=done, total=total)

        return asyncio.run(materialize_in_process(settings, request, report))


@app.command()
def parity(
    service: Annotated[str, typer.Option(help="host:port of the running feature service.")],
    ref: Annotated[
        list[str] | None, typer.Option(help='A "view:feature" ref to show (default: every feature checked); repeat.')
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(envvar="FRESCO_TOKEN_FILE", help="File holding a bearer token (when the service has auth on)."),
    ] = None,
) -> None:
    """Online-offline parity: per feature, sampled served values checked against the offline path."""
    try:
        security = ClientSecurity.from_env(token_file)
    except (OSError, ValueError) as err:
        raise typer.BadParameter(str(err), param_hint="--token-file") from None
    try:
        with security.channel(service) as channel:
            response: pb.GetFeatureParityResponse = pb_grpc.FeatureServiceStub(channel).GetFeatureParity(
                pb.GetFeatureParityRequest(feature_refs=ref or []), timeout=30, metadata=security.metadata()
            )
    except grpc.RpcError as err:
        errors.print(f"[red]parity failed:[/red] {err.code().name}: {escape(str(err.details()))}")
        raise typer.Exit(1) from None
    console.print(parity_table(response))
    for feature in response.features:
        for example in feature.examples:
            console.print(f"{escape(feature.feature_ref)}: {escape(example)}", highlight=False)


def parity_table(response: pb.GetFeatureParityResponse) -> Table:
    """One line per feature: values checked, mismatched (and their share of those compared), missing offline."""
    table = Table(title=f"online-offline parity (sampling {response.sample_rate:.2%} of served entities)")
    for column in ("feature", "checked", "mismatched", "mismatch rate", "missing offline"):
        table.add_column(column, no_wrap=True)
    for feature in response.features:
        compared = feature.checked - feature.missing_offline
        rate = f"{feature.mismatched / compared:.2%}" if compared else "-"
        cells = [feature.feature_ref, str(feature.checked), str(feature.mismatched), rate, str(feature.missing_offline)]
        table.add_row(*(escape(c) for c in cells))
    return table


def print_outcome(response: pb.MaterializeResponse, dry_run: bool) -> None:
    """Rows read, written and rejected, the first rejections, and the statistics table."""
    written = "would write" if dry_run else "wrote"
    console.print(
        f"{response.feature_view}: read {response.rows_read} rows, {written} {response.rows_written} entities, "
        f"rejected {response.rows_rejected} rows",
        highlight=False,
    )
    if response.rejected_rows:
        table = Table(title=f"rejected rows (first {len(response.rejected_rows)})")
        for column in ("row", "feature", "violation", "expected", "actual"):
            table.add_column(column)
        for rejection in response.rejected_rows:
            for violation in rejection.violations:
                table.add_row(
                    str(rejection.row_index),
                    violation.feature or "-",
                    _VIOLATIONS.get(violation.code, str(violation.code)),
                    violation.expected,
                    violation.actual,
                )
        console.print(table)
    console.print(statistics_table(response.statistics))


def statistics_table(statistics: spb.FeatureViewStatistics) -> Table:
    """One line per feature: count, null rate, and numeric moments or top categories."""
    table = Table(title=f"statistics of {statistics.feature_view} ({statistics.row_count} valid rows)")
    for column in ("feature", "count", "null rate", "mean", "std", "min", "p50", "max", "distinct", "top"):
        table.add_column(column, no_wrap=column != "top")
    for feature in statistics.features:
        cells = [feature.feature_name, str(feature.count), f"{feature.null_rate:.1%}"]
        if feature.HasField("numeric"):
            numeric = feature.numeric
            median = next((p.value for p in numeric.percentiles if p.quantile == 0.5), float("nan"))
            cells += [f"{numeric.mean:.4g}", f"{numeric.stddev:.4g}", f"{numeric.min:.4g}", f"{median:.4g}"]
            cells += [f"{numeric.max:.4g}", "", ""]
        elif feature.HasField("categorical"):
            categorical = feature.categorical
            top = ", ".join(f"{c.value} {c.fraction:.0%}" for c in categorical.top_categories[:3])
            cells += ["", "", "", "", "", str(categorical.distinct_count), top]
        else:
            cells += [""] * 7
        table.add_row(*(escape(c) for c in cells))
    return table
