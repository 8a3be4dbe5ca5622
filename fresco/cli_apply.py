"""`fresco apply -f deployments.yaml` and `fresco diff -f deployments.yaml`: make the model manager hold what the
file declares (models, versions, aliases, the served version and how it rolls out), or show what that would change.

Every model is checked and planned (reads only) before anything changes: a misspelled field, a missing artifact
or a version whose registered bytes differ from the file's stops the whole apply with nothing changed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich.console import Console
from rich.markup import escape

from fresco import deployments_file
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.cli_manager import TIMEOUT_S, Manager, ServiceOption, TokenFileOption, connect
from fresco.cli_models import sha256_of, upload_requests
from fresco.deployments_file import DeploymentsFileError, ModelDeclaration, VersionDeclaration
from fresco.rollout_view import apply_lines, strategy_text

console = Console()
errors = Console(stderr=True)
EXIT_BAD_FILE = 2

FileOption = Annotated[
    Path,
    typer.Option(
        "--file", "-f", exists=True, dir_okay=False, readable=True, help="The deployments file (see README: apply)."
    ),
]
ReasonOption = Annotated[str, typer.Option(help="Why, for the audit log (default: the file's `reason`).")]


@dataclass(frozen=True)
class Upload:
    """A declared version the registry does not hold yet, with its artifact's digest."""

    declaration: VersionDeclaration
    sha256: str
    size: int


@dataclass
class ModelPlan:
    """What applying one model would do on the client's side, before the server's deployment diff."""

    declared: ModelDeclaration
    exists: bool
    uploads: list[Upload] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def pending(self) -> set[int]:
        """Version numbers this plan registers."""
        return {upload.declaration.version for upload in self.uploads}


def load_or_exit(path: Path) -> deployments_file.DeploymentsFile:
    """The parsed file; every problem printed with its YAML path and exit code 2 otherwise."""
    try:
        return deployments_file.load(path)
    except DeploymentsFileError as err:
        errors.print(f"[red]{escape(str(path))} is not a valid deployments file:[/red]")
        for problem in err.problems:
            errors.print(f"  {escape(problem)}", highlight=False)
        raise typer.Exit(EXIT_BAD_FILE) from None


def _registered(manager: Manager, name: str) -> dict[int, rpb.ModelVersion]:
    found: dict[int, rpb.ModelVersion] = {}
    token = ""
    while True:
        request = pb.ListModelVersionsRequest(model_name=name, page_token=token)
        page = manager.stub.ListModelVersions(request, timeout=TIMEOUT_S, metadata=manager.metadata)
        found.update((v.version, v) for v in page.model_versions)
        token = page.next_page_token
        if not token:
            return found


def plan(manager: Manager, index: int, declared: ModelDeclaration) -> ModelPlan:
    """Compare one declared model with the registry (reads only)."""
    try:
        model = manager.stub.GetModel(
            pb.GetModelRequest(name=declared.name), timeout=TIMEOUT_S, metadata=manager.metadata
        )
    except grpc.RpcError as err:
        if not isinstance(err, grpc.Call) or err.code() != grpc.StatusCode.NOT_FOUND:
            raise
        result = ModelPlan(declared, exists=False)
        registered: dict[int, rpb.ModelVersion] = {}
    else:
        result = ModelPlan(declared, exists=True)
        registered = _registered(manager, declared.name)
        for key in ("owner", "description"):
            have, want = getattr(model.model, key), getattr(declared.model, key)
            if want and have != want:
                result.notes.append(
                    f"{key} stays {have!r}: apply creates models but does not edit them (file: {want!r})"
                )
    for j, version in enumerate(declared.versions):
        digest, size = sha256_of(version.artifact)
        held = registered.get(version.version)
        if held is None:
            result.uploads.append(Upload(version, digest, size))
        elif held.sha256 != digest:
            result.problems.append(
                f"models[{index}].versions[{j}]: version {version.version} of {declared.name} is registered with "
                f"sha256 {held.sha256[:12]}…, but {version.artifact} hashes to {digest[:12]}…; versions are "
                "immutable: declare the new artifact under a new version number"
            )
    return result


def local_changes(plan: ModelPlan) -> list[str]:
    """The registry changes applying would make before the deployment: a model created, versions registered."""
    declared = plan.declared
    lines = []
    if not plan.exists:
        lines.append(
            f"+ create model {declared.name}" + (f" (owner {declared.model.owner})" if declared.model.owner else "")
        )
    for upload in plan.uploads:
        lines.append(
            f"+ register version {upload.declaration.version} from {upload.declaration.artifact} "
            f"(sha256 {upload.sha256[:12]}…, {upload.size} bytes)"
        )
    registered = len(declared.versions) - len(plan.uploads)
    if registered:
        lines.append(f"= {registered} declared version(s) registered already, same sha256")
    return lines + [f"! {note}" for note in plan.notes]


def _needs(declared: ModelDeclaration) -> set[int]:
    deployment = declared.deployment
    return {deployment.version, *deployment.aliases.values(), deployment.fallback_version} - {0}


def _request(declared: ModelDeclaration, dry_run: bool, reason: str) -> pb.ApplyDeploymentRequest:
    return pb.ApplyDeploymentRequest(
        deployment=declared.deployment,
        expected_generation=declared.expected_generation,
        dry_run=dry_run,
        reason=reason,
    )


def _plans(manager: Manager, file: deployments_file.DeploymentsFile) -> list[ModelPlan]:
    plans = [plan(manager, i, declared) for i, declared in enumerate(file.models)]
    problems = [problem for p in plans for problem in p.problems]
    if problems:
        errors.print("[red]nothing applied:[/red]")
        for problem in problems:
            errors.print(f"  {escape(problem)}", highlight=False)
        raise typer.Exit(1)
    return plans


def _say(line: str, style: str | None = None) -> None:
    console.print(f"[{style}]{escape(line)}[/{style}]" if style else escape(line), highlight=False)


def register_versions(manager: Manager, plan: ModelPlan, reason: str) -> None:
    """Create the model if the plan says it is missing, then upload the versions it lacks."""
    declared = plan.declared
    if not plan.exists:
        create = pb.CreateModelRequest(model=declared.model, reason=reason)
        manager.stub.CreateModel(create, timeout=TIMEOUT_S, metadata=manager.metadata)
        _say(f"  + created model {declared.name}")
    for upload in plan.uploads:
        metadata = pb.UploadModelVersionMetadata()
        metadata.CopyFrom(upload.declaration.metadata)
        metadata.expected_sha256, metadata.expected_size_bytes = upload.sha256, upload.size
        metadata.reason = metadata.reason or reason
        reply = manager.stub.UploadModelVersion(
            upload_requests(metadata, upload.declaration.artifact), timeout=TIMEOUT_S, metadata=manager.metadata
        )
        _say(f"  + registered version {reply.model_version.version} (sha256 {reply.model_version.sha256[:12]}…)")


def apply(
    file: FileOption, service: ServiceOption, token_file: TokenFileOption = None, reason: ReasonOption = ""
) -> None:
    """Create missing models, register missing versions (matched by number and sha256), then apply each
    model's deployment; applying the same file again changes nothing."""
    declared = load_or_exit(file)
    why = reason or declared.reason
    with connect(service, token_file, "apply") as manager:
        for model_plan in _plans(manager, declared):
            name = model_plan.declared.name
            _say(f"{name}:", "bold")
            register_versions(manager, model_plan, why)
            response = manager.stub.ApplyDeployment(
                _request(model_plan.declared, False, why), timeout=TIMEOUT_S, metadata=manager.metadata
            )
            style = "yellow" if response.outcome == pb.APPLY_OUTCOME_HELD else None
            for line in apply_lines(response, dry_run=False):
                _say(f"  {line}", style)


def diff(file: FileOption, service: ServiceOption, token_file: TokenFileOption = None) -> None:
    """Show what `fresco apply -f` would change, changing nothing (the server's dry run for deployments)."""
    declared = load_or_exit(file)
    with connect(service, token_file, "diff") as manager:
        for model_plan in _plans(manager, declared):
            model = model_plan.declared
            _say(f"{model.name}:", "bold")
            for line in local_changes(model_plan):
                _say(f"  {line}")
            waiting = sorted(_needs(model) & model_plan.pending())
            if not model_plan.exists or waiting:
                deployment = model.deployment
                _say(
                    f"  + deployment serving v{deployment.version} with {strategy_text(deployment.strategy)}; "
                    f"the server checks it once {'the model and ' if not model_plan.exists else ''}"
                    f"version(s) {', '.join(map(str, waiting)) or deployment.version} are registered"
                )
                continue
            response = manager.stub.ApplyDeployment(
                _request(model, True, ""), timeout=TIMEOUT_S, metadata=manager.metadata
            )
            for line in apply_lines(response, dry_run=True):
                _say(f"  {line}")
