"""`fresco models promote` (through the promotion gates, watched as an operation) and `fresco models rollback`."""

from __future__ import annotations

import time
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.markup import escape

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.api.models.v1 import rollout_pb2 as ro
from fresco.cli_manager import TIMEOUT_S, Manager, ServiceOption, TokenFileOption, connect
from fresco.rollout_view import ACTIVE, gate_text, operation_text, rollout_summary

console = Console()
errors = Console(stderr=True)


Target = Literal["candidate", "production"]
EXIT_GATES_FAILED = 3


def promote(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(min=1, help="Version to promote.")],
    service: ServiceOption,
    token_file: TokenFileOption = None,
    to: Annotated[Target, typer.Option("--to", help="Stage to move the version to through its gates.")] = "candidate",
    force: Annotated[
        bool, typer.Option("--force", help="Promote even if a gate fails (audited; needs --reason).")
    ] = False,
    reason: Annotated[str, typer.Option(help="Why, for the audit log.")] = "",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Run the gates without changing the stage.")] = False,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Watch the gates until the promotion ends.")] = True,
) -> None:
    """Run a version's promotion gates and move it to --to when they pass; prints each gate's value and
    threshold as it finishes. Exit code 3 when a gate blocks the promotion."""
    if force and not reason.strip():
        raise typer.BadParameter("--force needs a --reason, which the audit log keeps", param_hint="--force")
    request = pb.PromoteModelVersionRequest(
        model_name=name,
        version=version,
        target_stage=rpb.ModelStage.Value(f"MODEL_STAGE_{to.upper()}"),
        reason=reason,
        force=force,
        dry_run=dry_run,
    )
    with connect(service, token_file, "promote") as m:
        operation = m.stub.PromoteModelVersion(request, timeout=TIMEOUT_S, metadata=m.metadata).operation
        console.print(f"operation {escape(operation.operation_id)}: {escape(operation_text(operation))}")
        if not wait:
            return
        operation = watch_operation(m, operation)
    if operation.state != rpb.OPERATION_STATE_SUCCEEDED:
        raise typer.Exit(EXIT_GATES_FAILED)


def watch_operation(m: Manager, operation: rpb.Operation) -> rpb.Operation:
    """Follow an operation until it is done, printing each gate result once as it appears; the last state."""
    shown: set[tuple[str, int, int]] = set()

    def show(current: rpb.Operation) -> None:
        for result in current.gate_results:
            key = (result.name, result.evaluated_at.seconds, result.evaluated_at.nanos)
            if key not in shown:
                shown.add(key)
                style = "green" if result.passed else "red"
                console.print(f"  [{style}]{escape(gate_text(result))}[/{style}]", highlight=False)

    show(operation)
    if not operation.done:
        request = pb.WatchOperationRequest(operation_id=operation.operation_id)
        for update in m.stub.WatchOperation(request, metadata=m.metadata):
            operation = update.operation
            show(operation)
            if operation.done:
                break
    while not operation.done:  # the stream ended early (e.g. the manager restarted): poll until it is done
        time.sleep(1.0)
        get = pb.GetOperationRequest(operation_id=operation.operation_id)
        operation = m.stub.GetOperation(get, timeout=TIMEOUT_S, metadata=m.metadata).operation
        show(operation)
    style = "green" if operation.state == rpb.OPERATION_STATE_SUCCEEDED else "red"
    console.print(f"[{style}]{escape(operation_text(operation))}[/{style}]", highlight=False)
    return operation


def rollback(
    name: Annotated[str, typer.Argument(help="Model name.")],
    service: ServiceOption,
    token_file: TokenFileOption = None,
    reason: Annotated[str, typer.Option(help="Why, for the rollout's events and the audit log.")] = "",
) -> None:
    """Return the model's traffic to its previous version: abort its active rollout, or else undo its last
    succeeded one (while the previous version is still warm)."""
    with connect(service, token_file, "rollback") as m:
        target, verb = rollback_target(m, name)
        if verb == "abort":
            done = m.stub.AbortRollout(
                pb.AbortRolloutRequest(rollout_id=target.rollout_id, reason=reason),
                timeout=TIMEOUT_S,
                metadata=m.metadata,
            ).rollout
        else:
            done = m.stub.UndoRollout(
                pb.UndoRolloutRequest(rollout_id=target.rollout_id, reason=reason),
                timeout=TIMEOUT_S,
                metadata=m.metadata,
            ).rollout
    what = "aborted the active rollout" if verb == "abort" else "undid the last succeeded rollout"
    console.print(f"{what} {escape(done.rollout_id)}: {escape(rollout_summary(done))}", highlight=False)


def rollback_target(m: Manager, name: str) -> tuple[ro.Rollout, Literal["abort", "undo"]]:
    """The model's active rollout to abort, else its newest succeeded one to undo; NOT_FOUND exits 1."""
    active = pb.ListRolloutsRequest(model_name=name, states=sorted(ACTIVE), page_size=1)
    found = m.stub.ListRollouts(active, timeout=TIMEOUT_S, metadata=m.metadata).rollouts
    if found:
        return found[0], "abort"
    succeeded = pb.ListRolloutsRequest(model_name=name, states=[ro.ROLLOUT_STATE_SUCCEEDED], page_size=1)
    found = m.stub.ListRollouts(succeeded, timeout=TIMEOUT_S, metadata=m.metadata).rollouts
    if found:
        return found[0], "undo"
    errors.print(f"[red]rollback failed:[/red] {escape(name)} has no active or succeeded rollout to roll back")
    raise typer.Exit(1)
