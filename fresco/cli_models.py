"""`fresco models`: register model versions in the model manager, list and show them, move aliases."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import grpc
import typer
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fresco.api.features.v1 import statistics_pb2 as spb
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import monitoring_pb2 as mpb
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.cli_labels import labels
from fresco.cli_manager import TIMEOUT_S, Manager, ServiceOption, TokenFileOption, connect
from fresco.cli_model_update import update
from fresco.cli_monitor import monitor
from fresco.cli_optimize import optimize
from fresco.cli_promote import promote, rollback
from fresco.cli_report import report as model_report
from fresco.rollout_view import stage_name, when
from fresco.safety_view import safety_table

app = typer.Typer(
    help="The model registry: register versions, list and show them, move aliases, update, promote, roll back.",
    no_args_is_help=True,
)
console = Console()
errors = Console(stderr=True)

CHUNK_BYTES = 1024 * 1024
Format = Literal["onnx", "torchscript", "tensorflow_saved_model", "xgboost", "lightgbm"]
M = TypeVar("M", bound=Message)
T = TypeVar("T")


@app.callback()
def models() -> None:
    """The model registry: register versions, list and show them, move aliases, update, promote, roll back."""


def _call(what: str, address: str, token_file: Path | None, call: Callable[[Manager], T]) -> T:
    """Run calls against the service; a gRPC error becomes one red line and exit code 1."""
    with connect(address, token_file, what) as manager:
        return call(manager)
    raise AssertionError("unreachable: connect exits on errors")  # for mypy: a context manager may swallow


def _pairs(option: str, items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=option)
        out[key] = value
    return out


def _json(option: str, path: Path | None, message: M) -> M:
    """A protobuf message from a JSON file (the message's proto3 JSON form), or the empty message."""
    if path is None:
        return message
    try:
        return json_format.Parse(path.read_text(), message)
    except (OSError, json_format.ParseError) as err:
        raise typer.BadParameter(str(err), param_hint=option) from None


def _read(option: str, path: Path | None) -> bytes:
    """A file's bytes, or none."""
    if path is None:
        return b""
    try:
        return path.read_bytes()
    except OSError as err:
        raise typer.BadParameter(str(err), param_hint=option) from None


def sha256_of(path: Path) -> tuple[str, int]:
    """The hex SHA-256 and size of a file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def upload_requests(metadata: pb.UploadModelVersionMetadata, path: Path) -> Iterator[pb.UploadModelVersionRequest]:
    """The upload stream: the metadata, then the file in 1 MiB chunks."""
    yield pb.UploadModelVersionRequest(metadata=metadata)
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            yield pb.UploadModelVersionRequest(chunk=chunk)


@app.command()
def register(
    name: Annotated[str, typer.Option(help="Model name; the model is created if it does not exist.")],
    version_file: Annotated[
        Path, typer.Option(exists=True, dir_okay=False, readable=True, help="The artifact to upload, e.g. model.onnx.")
    ],
    service: ServiceOption,
    token_file: TokenFileOption = None,
    model_format: Annotated[Format, typer.Option("--format", help="Artifact format.")] = "onnx",
    version: Annotated[int, typer.Option(min=0, help="Exact version number to take; 0 takes the next.")] = 0,
    owner: Annotated[str, typer.Option(help="Owner of a model created by this call.")] = "",
    description: Annotated[str, typer.Option(help="Description of the version.")] = "",
    framework: Annotated[str, typer.Option(help='Training framework, e.g. "sklearn 1.5".')] = "",
    code_commit: Annotated[str, typer.Option(help="Commit of the training code.")] = "",
    dataset_uri: Annotated[str, typer.Option(help="Where the training data set is.")] = "",
    dataset_sha256: Annotated[str, typer.Option(help="SHA-256 of the training data set.")] = "",
    parent_version: Annotated[int, typer.Option(min=0, help="Version this one derives from; 0 for none.")] = 0,
    label: Annotated[list[str] | None, typer.Option(help="KEY=VALUE tag of the version; repeat.")] = None,
    metric: Annotated[list[str] | None, typer.Option(help="NAME=VALUE evaluation metric; repeat.")] = None,
    report: Annotated[Path | None, typer.Option(help="Evaluation report as TrainingReport JSON.")] = None,
    training_statistics: Annotated[
        Path | None, typer.Option(help="Training statistics as FeatureViewStatistics JSON (its features are used).")
    ] = None,
    signature: Annotated[Path | None, typer.Option(help="Input/output signature as ModelSignature JSON.")] = None,
    backend: Annotated[str, typer.Option(help='Preferred backend, e.g. "onnxruntime".')] = "",
    expected_memory_bytes: Annotated[int, typer.Option(min=0, help="Memory one loaded copy takes; 0 if unknown.")] = 0,
    reason: Annotated[str, typer.Option(help="Why, for the audit log.")] = "",
    junit_xml: Annotated[
        Path | None,
        typer.Option(dir_okay=False, help="The model's unit-test report (JUnit XML), for the safety score."),
    ] = None,
    coverage_xml: Annotated[
        Path | None, typer.Option(dir_okay=False, help="The unit tests' line coverage (Cobertura XML, `coverage xml`).")
    ] = None,
    drift_policy: Annotated[
        Path | None, typer.Option(help="The version's drift thresholds as DriftPolicy JSON; the defaults without.")
    ] = None,
) -> None:
    """Upload an artifact as a new version (its sha256 checked by the registry) and print the version."""
    evaluation = _json("--report", report, rpb.TrainingReport())
    try:
        for key, value in _pairs("--metric", metric).items():
            evaluation.metrics[key] = float(value)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--metric") from None
    statistics = _json("--training-statistics", training_statistics, spb.FeatureViewStatistics())
    model_signature = _json("--signature", signature, rpb.ModelSignature())
    digest, size = sha256_of(version_file)
    metadata = pb.UploadModelVersionMetadata(
        model_name=name,
        format=rpb.ModelFormat.Value(f"MODEL_FORMAT_{model_format.upper()}"),
        framework=framework,
        signature=model_signature,
        training_statistics=statistics.features,
        report=evaluation,
        description=description,
        labels=_pairs("--label", label),
        expected_sha256=digest,
        expected_size_bytes=size,
        lineage=rpb.Lineage(
            code_commit=code_commit,
            training_dataset_uri=dataset_uri,
            training_dataset_sha256=dataset_sha256,
            parent_version=parent_version,
        ),
        backend_hints=rpb.BackendHints(preferred_backend=backend, expected_memory_bytes=expected_memory_bytes),
        version=version,
        reason=reason,
    )
    if drift_policy is not None:
        metadata.drift_policy.CopyFrom(_json("--drift-policy", drift_policy, rpb.DriftPolicy()))
    if junit_xml is not None or coverage_xml is not None:
        metadata.test_report.CopyFrom(
            rpb.TestReport(
                junit_xml=_read("--junit-xml", junit_xml), coverage_xml=_read("--coverage-xml", coverage_xml)
            )
        )

    def run(m: Manager) -> rpb.ModelVersion:
        try:
            m.stub.GetModel(pb.GetModelRequest(name=name), timeout=TIMEOUT_S, metadata=m.metadata)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
            model = rpb.Model(name=name, owner=owner, signature=model_signature)
            m.stub.CreateModel(
                pb.CreateModelRequest(model=model, reason=reason), timeout=TIMEOUT_S, metadata=m.metadata
            )
            console.print(f"created model [bold]{escape(name)}[/bold]")
        reply = m.stub.UploadModelVersion(
            upload_requests(metadata, version_file), timeout=TIMEOUT_S, metadata=m.metadata
        )
        return reply.model_version

    registered = _call("register", service, token_file, run)
    console.print(
        f"registered [bold]{escape(name)}[/bold] version {registered.version} "
        f"({registered.size_bytes} bytes, sha256 {registered.sha256}) stage {stage_name(registered.stage)}"
    )


@app.command("list")
def list_models(
    service: ServiceOption,
    token_file: TokenFileOption = None,
    owner: Annotated[str, typer.Option(help="Only models of this owner.")] = "",
) -> None:
    """All models: owner, latest and production versions, aliases."""

    def run(m: Manager) -> list[rpb.Model]:
        found: list[rpb.Model] = []
        token = ""
        while True:
            page = m.stub.ListModels(
                pb.ListModelsRequest(owner=owner, page_token=token), timeout=TIMEOUT_S, metadata=m.metadata
            )
            found.extend(page.models)
            token = page.next_page_token
            if not token:
                return found

    table = Table(title="Models")
    for column in ("name", "owner", "latest", "production", "aliases", "updated"):
        table.add_column(column)
    for model in _call("list", service, token_file, run):
        aliases = ", ".join(f"{a}→{v}" for a, v in sorted(model.aliases.items()))
        table.add_row(
            escape(model.name),
            escape(model.owner),
            str(model.latest_version or "-"),
            str(model.production_version or "-"),
            escape(aliases),
            when(model.updated_at),
        )
    console.print(table)


@app.command()
def show(
    name: Annotated[str, typer.Argument(help="Model name.")],
    service: ServiceOption,
    token_file: TokenFileOption = None,
    version: Annotated[int, typer.Option(min=0, help="Show this version in full.")] = 0,
    alias: Annotated[str, typer.Option(help="Show the version this alias points at in full.")] = "",
) -> None:
    """A model and its versions, or one version in full (lineage, metrics, statistics, hints)."""
    if version or alias:
        request = pb.GetModelVersionRequest(model_name=name)
        if alias:
            request.alias = alias
        else:
            request.version = version
        found = _call(
            "show",
            service,
            token_file,
            lambda m: m.stub.GetModelVersion(request, timeout=TIMEOUT_S, metadata=m.metadata),
        ).model_version
        console.print_json(json_format.MessageToJson(found, preserving_proto_field_name=True))
        return

    def run(m: Manager) -> tuple[rpb.Model, list[rpb.ModelVersion], mpb.SafetyScore | None]:
        model = m.stub.GetModel(pb.GetModelRequest(name=name), timeout=TIMEOUT_S, metadata=m.metadata).model
        found: list[rpb.ModelVersion] = []
        token = ""
        while True:
            page = m.stub.ListModelVersions(
                pb.ListModelVersionsRequest(model_name=name, page_token=token), timeout=TIMEOUT_S, metadata=m.metadata
            )
            found.extend(page.model_versions)
            token = page.next_page_token
            if not token:
                break
        try:
            request = pb.GetSafetyScoreRequest(model_name=name)
            score = m.stub.GetSafetyScore(request, timeout=TIMEOUT_S, metadata=m.metadata).safety_score
        except grpc.RpcError as err:  # a manager without the RPC still shows the model
            if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            score = None
        return model, found, score

    model, versions, score = _call("show", service, token_file, run)
    console.print(f"[bold]{escape(model.name)}[/bold] owner {escape(model.owner or '-')}: {escape(model.description)}")
    table = Table(title=f"Versions of {escape(model.name)}")
    for column in ("version", "stage", "aliases", "sha256", "bytes", "code commit", "created by", "created"):
        table.add_column(column)
    for v in versions:
        table.add_row(
            str(v.version),
            stage_name(v.stage),
            escape(", ".join(v.aliases)),
            v.sha256[:12],
            str(v.size_bytes),
            escape(v.lineage.code_commit or "-"),
            escape(v.created_by),
            when(v.created_at),
        )
    console.print(table)
    if score is None:
        console.print("safety score: not available from this model manager")
    else:
        console.print(safety_table(score))


@app.command()
def alias(
    name: Annotated[str, typer.Argument(help="Model name.")],
    alias_name: Annotated[str, typer.Argument(metavar="ALIAS", help='Alias, e.g. "champion".')],
    service: ServiceOption,
    token_file: TokenFileOption = None,
    version: Annotated[int | None, typer.Argument(help="Version the alias points at (not with --delete).")] = None,
    delete: Annotated[bool, typer.Option("--delete", help="Remove the alias.")] = False,
    reason: Annotated[str, typer.Option(help="Why, for the audit log.")] = "",
) -> None:
    """Point an alias at a version, or remove it."""
    if delete == (version is not None):
        raise typer.BadParameter("give a VERSION, or --delete without one")
    if delete:
        request = pb.DeleteModelAliasRequest(model_name=name, alias=alias_name, reason=reason)
        removed = _call(
            "alias",
            service,
            token_file,
            lambda m: m.stub.DeleteModelAlias(request, timeout=TIMEOUT_S, metadata=m.metadata),
        )
        console.print(f"removed alias {escape(alias_name)} of {escape(name)} (was version {removed.previous_version})")
        return
    assert version is not None
    set_request = pb.SetModelAliasRequest(model_name=name, alias=alias_name, version=version, reason=reason)
    moved = _call(
        "alias",
        service,
        token_file,
        lambda m: m.stub.SetModelAlias(set_request, timeout=TIMEOUT_S, metadata=m.metadata),
    )
    was = f" (was version {moved.previous_version})" if moved.previous_version else ""
    console.print(f"alias {escape(alias_name)} of {escape(name)} → version {version}{was}")


# Updating, promotion and rollback live in their own modules; registered after the registry's commands.
app.command()(update)
app.command()(promote)
app.command()(rollback)
app.command()(monitor)
app.command()(labels)
app.command("report")(model_report)
app.command()(optimize)
