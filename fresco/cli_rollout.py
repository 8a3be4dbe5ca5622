"""`fresco rollout`: a model's rollout, live (`status --watch`), and its verbs: promote, abort, retry, undo, pause,
resume."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import rollout_pb2 as ro
from fresco.cli_manager import TIMEOUT_S, Manager, ServiceOption, TokenFileOption, connect, fail
from fresco.rollout_view import ACTIVE, EXIT_CODES, event_lines, rollout_summary, rollout_view

app = typer.Typer(
    help="Rollouts: watch one live; promote, abort, retry, undo, pause or resume it.", no_args_is_help=True
)
console = Console()
errors = Console(stderr=True)

NameArgument = Annotated[str, typer.Argument(help="Model name: its most recent rollout.")]
ReasonOption = Annotated[str, typer.Option(help="Why, for the rollout's events and the audit log.")]
VerbRequest = (
    pb.PromoteRolloutRequest
    | pb.AbortRolloutRequest
    | pb.RetryRolloutRequest
    | pb.UndoRolloutRequest
    | pb.PauseRolloutRequest
    | pb.ResumeRolloutRequest
)
EXIT_INTERRUPTED = 130
# A manager restarting mid-watch is waited for this long before the watch gives up.
RECONNECT_S = 120.0


@app.callback()
def rollout() -> None:
    """Rollouts: watch one live; promote, abort, retry, undo, pause or resume it."""


def current(m: Manager, name: str) -> ro.Rollout:
    """The model's most recent rollout."""
    request = pb.GetRolloutStatusRequest(model_name=name)
    return m.stub.GetRolloutStatus(request, timeout=TIMEOUT_S, metadata=m.metadata).rollout


@app.command()
def status(
    name: NameArgument,
    service: ServiceOption,
    token_file: TokenFileOption = None,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Follow it live until it ends; exit 0 on success, 3 on rollback.")
    ] = False,
    events: Annotated[int, typer.Option(min=0, help="How many of the last events to show.")] = 5,
) -> None:
    """The model's most recent rollout: strategy, step, weights, state, the last verdict with each decision's
    metric, value, threshold, samples and window, and the last events. With --watch the exit code says how
    it ended: 0 succeeded, 3 rolled back or aborted, 4 failed."""
    with connect(service, token_file, "rollout status") as m:
        if not watch:
            console.print(rollout_view(current(m, name), events))
            return
        try:
            final = watch_rollout(m, name, events)
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None
    raise typer.Exit(EXIT_CODES.get(final.state, 1))


def watch_rollout(m: Manager, name: str, recent_events: int) -> ro.Rollout:
    """Show the rollout live from WatchRollout until it reaches a terminal state, printing each new event with
    the decisions behind it; reconnects (resuming after the last revision) while the manager restarts."""
    request = pb.WatchRolloutRequest(model_name=name)
    last: ro.Rollout | None = None
    unavailable_since: float | None = None
    with Live(console=console, auto_refresh=False, transient=False) as live:
        while True:
            try:
                for update in m.stub.WatchRollout(request, metadata=m.metadata):
                    unavailable_since = None
                    last = update.rollout
                    request = pb.WatchRolloutRequest(rollout_id=last.rollout_id, resume_after_revision=update.revision)
                    for event in update.new_events:
                        for line in event_lines(event):
                            live.console.print(escape(line), highlight=False)
                    live.update(rollout_view(last, recent_events), refresh=True)
                    if last.state in EXIT_CODES:
                        return last
            except grpc.RpcError as err:
                code = err.code() if isinstance(err, grpc.Call) else None
                unavailable_since = unavailable_since or time.monotonic()
                if code != grpc.StatusCode.UNAVAILABLE or time.monotonic() - unavailable_since > RECONNECT_S:
                    live.stop()
                    fail("rollout status", err)
                live.console.print("[yellow]model manager unavailable; reconnecting…[/yellow]")
                time.sleep(1.0)
                continue
            if last is not None and last.state not in ACTIVE:
                return last  # the stream ended on a state this client does not know as terminal
            # The server closed the stream before the end: resume from the last revision, without spinning.
            time.sleep(1.0)


def _verb(name: str, service: str, token_file: Path | None, what: str, method: str, request: VerbRequest) -> None:
    """Call one rollout verb on the model's most recent rollout and print the rollout after it."""
    with connect(service, token_file, f"rollout {what}") as m:
        request.rollout_id = current(m, name).rollout_id
        done: ro.Rollout = getattr(m.stub, method)(request, timeout=TIMEOUT_S, metadata=m.metadata).rollout
    console.print(f"{what}: {escape(rollout_summary(done))}", highlight=False)
    if done.message:
        console.print(f"  {escape(done.message)}", highlight=False)


@app.command("promote")
def promote_rollout(
    name: NameArgument,
    service: ServiceOption,
    token_file: TokenFileOption = None,
    full: Annotated[bool, typer.Option("--full", help="Skip every remaining step: all traffic now.")] = False,
    reason: ReasonOption = "",
) -> None:
    """Skip the current step's wait and analysis, or with --full go straight to 100%."""
    _verb(name, service, token_file, "promoted", "PromoteRollout", pb.PromoteRolloutRequest(reason=reason, full=full))


@app.command()
def abort(
    name: NameArgument, service: ServiceOption, token_file: TokenFileOption = None, reason: ReasonOption = ""
) -> None:
    """Return all traffic to the baseline now; applying the same spec again does not restart it (retry does)."""
    _verb(name, service, token_file, "aborted", "AbortRollout", pb.AbortRolloutRequest(reason=reason))


@app.command()
def retry(
    name: NameArgument, service: ServiceOption, token_file: TokenFileOption = None, reason: ReasonOption = ""
) -> None:
    """Start a rolled-back, failed or aborted rollout again from its first step."""
    _verb(name, service, token_file, "retried", "RetryRollout", pb.RetryRolloutRequest(reason=reason))


@app.command()
def undo(
    name: NameArgument, service: ServiceOption, token_file: TokenFileOption = None, reason: ReasonOption = ""
) -> None:
    """Return a succeeded rollout's traffic to its baseline while the baseline is still warm."""
    _verb(name, service, token_file, "undone", "UndoRollout", pb.UndoRolloutRequest(reason=reason))


@app.command()
def pause(
    name: NameArgument, service: ServiceOption, token_file: TokenFileOption = None, reason: ReasonOption = ""
) -> None:
    """Hold the rollout at its current weights until resumed."""
    _verb(name, service, token_file, "paused", "PauseRollout", pb.PauseRolloutRequest(reason=reason))


@app.command()
def resume(
    name: NameArgument,
    service: ServiceOption,
    token_file: TokenFileOption = None,
    full: Annotated[
        bool, typer.Option("--full", help="Skip the remaining steps: all traffic to the new version.")
    ] = False,
    reason: ReasonOption = "",
) -> None:
    """Continue a paused rollout (e.g. one that paused on too few samples, or at a step with pause)."""
    _verb(
        name, service, token_file, "resumed", "ResumeRollout", pb.ResumeRolloutRequest(reason=reason, promote_full=full)
    )
