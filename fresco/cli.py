"""`fresco`: run a local Fresco (`fresco up`) or see one serve real traffic (`fresco demo`)."""

from __future__ import annotations

import asyncio
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated

import grpc
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fresco import demo as traffic_demo
from fresco import story, story_experiment, story_monitor
from fresco.api.inference import grpc_service_pb2, grpc_service_pb2_grpc
from fresco.cli_apply import apply as apply_command
from fresco.cli_apply import diff as diff_command
from fresco.cli_audit import audit as audit_command
from fresco.cli_experiments import app as experiments_app
from fresco.cli_experiments import connect as connect_experiments
from fresco.cli_features import app as features_app
from fresco.cli_manager import connect
from fresco.cli_models import app as models_app
from fresco.cli_rollout import app as rollout_app
from fresco.credentials import ClientSecurity
from fresco.suite import (
    LocalAuth,
    ServiceFailed,
    ServiceProcess,
    Suite,
    issue_local_tokens,
    start_platform,
    start_suite,
)
from fresco.training import (
    ExportedModel,
    demo_dataset,
    train_better_classifier,
    train_classifier,
    train_tiny_classifier,
    write_failing_model,
    write_holdout,
)
from model_manager.loader import predictor_model_name

app = typer.Typer(
    help="Fresco: an open ML serving platform on your machine.", no_args_is_help=True, add_completion=False
)
app.add_typer(experiments_app, name="experiments")
app.add_typer(features_app, name="features")
app.add_typer(models_app, name="models")
app.add_typer(rollout_app, name="rollout")
console = Console()
errors = Console(stderr=True)

EXIT_NO_MODELS = 2
EXIT_INTERRUPTED = 130
# Enough of a dead service's output to show why it died without flooding the terminal.
OUTPUT_TAIL_LINES = 40


def models_in(repository: Path) -> list[str]:
    """Models of a repository that have at least one version with a model file, as the predictor lays them out."""
    if not repository.is_dir():
        return []
    return sorted(
        model.name
        for model in repository.iterdir()
        if model.is_dir() and any(v.name.isdigit() and (v / "model.onnx").is_file() for v in model.iterdir())
    )


def endpoints_table(suite: Suite) -> Table:
    """Where each running service listens."""
    table = Table(title="Fresco services")
    for column in ("service", "gRPC", "metrics", "pid"):
        table.add_column(column, no_wrap=True)
    for service in suite.services:
        pid = str(service.process.pid) if service.process else "-"
        table.add_row(service.module, service.address, service.metrics_url or "-", pid)
    return table


def report_exit_codes(codes: dict[str, int | None]) -> bool:
    """Print each service's exit code; whether they all exited 0."""
    for module, code in codes.items():
        style = "green" if code == 0 else "red"
        console.print(f"{module} exited with code [{style}]{code}[/{style}]")
    return all(code == 0 for code in codes.values())


def say(text: str) -> None:
    """Print text as it is: no markup, no highlighting (paths, service output, numbers)."""
    console.print(text, markup=False, highlight=False)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _hold_signals() -> None:
    # Stopping is bounded (SIGTERM, grace, SIGKILL); a second Ctrl-C must not cut it short and orphan services.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _watch(suite: Suite, stop: threading.Event) -> ServiceProcess | None:
    """Block until `stop` is set (None) or a service exits on its own (that service)."""
    while not stop.wait(0.2):
        for service in suite.services:
            if service.process is not None and service.process.poll() is not None:
                return service
    return None


@app.command()
def up(
    model_repository: Annotated[
        Path, typer.Option(help="Model repository: <dir>/<model>/config.yaml and <dir>/<model>/<version>/model.onnx.")
    ] = Path("models"),
    log_dir: Annotated[Path | None, typer.Option(help="Write each service's output to <dir>/<service>.log.")] = None,
    feature_definitions: Annotated[
        Path | None, typer.Option(help="Feature definitions YAML: also start the feature service (embedded SQLite).")
    ] = None,
    feature_db: Annotated[Path | None, typer.Option(help="The feature service's SQLite file.")] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(help="Where this run's bearer tokens go (default: --log-dir, else a temporary directory)."),
    ] = None,
) -> None:
    """Start the predictor, the gateway (and the feature service) on loopback; serve until Ctrl-C.
    Auth is on: the services verify bearer tokens issued for this run, and the admin token is printed."""
    models = models_in(model_repository)
    if not models:
        state = "holds no models" if model_repository.is_dir() else "does not exist"
        errors.print(f"[red]Model repository {escape(str(model_repository.absolute()))} {state}.[/red]")
        errors.print("Fresco serves models laid out as <repository>/<model>/<version>/model.onnx.", highlight=False)
        errors.print("Get one:   fresco demo --workdir DIR   (trains a model into DIR/models)", highlight=False)
        errors.print("Serve it:  fresco up --model-repository DIR/models", highlight=False)
        raise typer.Exit(EXIT_NO_MODELS)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
    temporary = state_dir is None and log_dir is None
    tokens_dir = state_dir or log_dir or Path(tempfile.mkdtemp(prefix="fresco-up-"))
    auth = issue_local_tokens(tokens_dir)
    say(f"starting predictor and gateway for {', '.join(models)} from {model_repository} …")
    # Until the suite is up, SIGTERM interrupts like Ctrl-C so the suite's own cleanup runs.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    suite: Suite | None = None
    try:
        suite = start_suite(
            model_repository.resolve(),
            log_dir=log_dir,
            feature_definitions=feature_definitions.resolve() if feature_definitions else None,
            feature_db=feature_db,
            auth=auth,
        )
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: stop.set())
        console.print(endpoints_table(suite))
        _print_auth(auth)
        console.print(f"gateway ready at {suite.services[-1].address} (Ctrl-C stops everything)")
        dead = _watch(suite, stop)
    except ServiceFailed as err:
        errors.print(f"[red]Fresco did not start:[/red] {escape(str(err))}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        errors.print("interrupted while starting; services stopped")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        _hold_signals()
        codes = suite.stop() if suite is not None else {}
        if temporary:
            shutil.rmtree(tokens_dir, ignore_errors=True)
    if dead is not None:
        code = dead.process.returncode if dead.process else None
        errors.print(f"[red]{dead.module} died unexpectedly with code {code}[/red]; its last output:")
        errors.print("".join(dead.lines[-OUTPUT_TAIL_LINES:]), markup=False, highlight=False, end="")
    else:
        console.print("stopped")
    clean = report_exit_codes(codes)
    if dead is not None or not clean:
        raise typer.Exit(1)


def _print_auth(auth: LocalAuth) -> None:
    say(f"auth on: the services verify the tokens of this run against {auth.tokens_file} (sha256 only)")
    say(f"admin token: {auth.admin_token_file}")
    say(f"  e.g. fresco features materialize --service ADDRESS --token-file {auth.admin_token_file} …")
    say(f"  or export FRESCO_TOKEN_FILE={auth.admin_token_file}")


@app.command()
def demo(
    requests: Annotated[int, typer.Option(min=1, help="Predict requests to send to v1 and check.")] = 2000,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at once.")] = 8,
    workdir: Annotated[
        Path | None, typer.Option(help="Where the models and logs go (kept); default: a temporary directory.")
    ] = None,
    check: Annotated[int, typer.Option(min=0, help="Answers to check against onnxruntime in process.")] = 200,
    window_s: Annotated[float, typer.Option(min=0.5, help="Length of the gateways' metric windows, seconds.")] = 2.0,
) -> None:
    """Run the model manager, a predictor, the experiment service and a gateway; register v1 and serve it; canary a
    better v2 to 100% through its gates; watch a bad v3 roll back on its own; run an A/B experiment of v2 against a
    tiny v4 and decide it; join late labels to v2's answers, flag a feature that drifts and block a promotion on it,
    and show the family's safety score; then stop."""
    root = Path(tempfile.mkdtemp(prefix="fresco-demo-")) if workdir is None else workdir
    root.mkdir(parents=True, exist_ok=True)
    versions = _train_versions(root / "models")
    v1 = versions.v1
    console.print(
        f"trained {v1.name} v1, v2, a deliberately bad v3 and a tiny v4: MLP classifiers on {len(v1.feature_names)} "
        "features "
        f"({', '.join(v1.feature_names)}) into ONNX input {v1.input_name!r}"
    )
    problems: list[str] = []
    console.print("starting the model manager, a predictor in its fleet, the experiment service and a gateway …")
    suite: Suite | None = None
    try:
        auth = issue_local_tokens(root / "auth")
        rules = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "alerts.yml"  # in a checkout
        flags = ("--alert-rules", str(rules)) if rules.is_file() else ()
        suite = start_platform(root, auth, window_s=window_s, experiments=True, manager_flags=flags)
        console.print(endpoints_table(suite))
        manager, predictor, experiments, gateway = (service.address for service in suite.services)
        with connect(manager, auth.admin_token_file, "demo") as m:
            problems += story.act_one(m, v1, console)
            if not problems:
                problems += _run_traffic(gateway, v1, requests, concurrency, check)
                problems += _check_auth(predictor, predictor_model_name(v1.name, 1), auth)
                rows = demo_dataset().holdout_features
                problems += story.acts_two_and_three(m, gateway, versions, rows, window_s, console)
            if not problems and versions.v4 is not None:
                data = demo_dataset()
                with connect_experiments(experiments, auth.admin_token_file, "demo") as x:
                    problems += story_experiment.act_four(
                        m, x, gateway, versions.v4, data.holdout_features, data.holdout_labels, console
                    )
                if not problems:
                    problems += story_monitor.act_five(
                        m, gateway, versions.v2, data.holdout_features, data.holdout_labels, 4, console
                    )
    except ServiceFailed as err:
        problems.append(f"Fresco did not start: {err}")
    except KeyboardInterrupt:
        problems.append("interrupted")
    finally:
        _hold_signals()
        codes = suite.stop() if suite is not None else {}
    if not report_exit_codes(codes):
        problems.append("a service did not stop cleanly")
    if problems:
        for problem in problems:
            errors.print(f"[red]FAILED:[/red] {escape(problem)}", highlight=False)
        errors.print(f"models and service logs kept in {root}", markup=False, highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED if "interrupted" in problems else 1)
    console.print(
        "[green]demo passed[/green]: v1 served and every checked answer matches; v2 passed its gates and "
        "its canary; v3 was rolled back on its own; no live request failed; the A/B experiment kept v2 over the "
        "tiny v4; late labels gave v2's accuracy; the drifted feature was flagged and blocked a promotion"
    )
    if workdir is None:
        shutil.rmtree(root, ignore_errors=True)


def _train_versions(repository: Path) -> story.Versions:
    v1 = train_classifier(repository)
    v2 = train_better_classifier(repository)
    v3 = write_failing_model(v1, repository)
    v4 = train_tiny_classifier(repository)
    return story.Versions(v1, v2, v3, write_holdout(repository.parent / "holdout.parquet"), v4)


def _run_traffic(address: str, model: ExportedModel, requests: int, concurrency: int, check: int) -> list[str]:
    """Send the demo's traffic, print what came back; the problems found."""
    rows = traffic_demo.request_rows(model.sample, requests)
    columns = (TextColumn("Predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("Predict", total=requests)
        traffic = asyncio.run(
            traffic_demo.send_traffic(
                address, model.name, model.feature_names, rows, concurrency, lambda _: progress.advance(task)
            )
        )
    answered, failed = traffic.answered, traffic.failed
    console.print(
        f"{requests} requests at concurrency {concurrency} in {traffic.elapsed_s:.2f} s: "
        f"{len(answered)} answered, {len(failed)} failed"
    )
    console.print(f"throughput: {traffic.throughput:.1f} requests/s")
    percentiles = traffic_demo.latency_percentiles_ms([o.latency_s for o in answered])
    if percentiles:
        shown = "  ".join(f"p{p} {ms:.2f} ms" for p, ms in percentiles.items())
        console.print(f"latency (client-side, per request): {shown}")
    problems = [f"{len(failed)} of {requests} requests failed, e.g. {failed[0].error}"] if failed else []

    report = traffic_demo.check_answers(traffic, rows, model.path, model.input_name, check)
    checked = f"checked {report.checked} answers against onnxruntime in process"
    if report.mismatches:
        console.print(f"{checked}: {len(report.mismatches)} differ")
        for mismatch in report.mismatches[:10]:
            say(f"  {mismatch}")
        problems.append(f"{len(report.mismatches)} checked answers differ from onnxruntime in process")
    else:
        console.print(f"{checked}: all match")

    example = next(((o.index, o.response) for o in answered if o.response is not None), None)
    if example is not None:
        index, response = example
        features = traffic_demo.row_features(model.feature_names, rows[index])
        console.print("example answer:")
        say("  features in:  " + ", ".join(f"{k}={v:.4f}" for k, v in features.items()))
        say(f"  outputs:      {traffic_demo.format_outputs(response)}")
        say(f"  model:        {response.model} version {response.model_version}")
        say(f"  trace id:     {response.trace_id}")
    return problems


def _check_auth(predictor: str, model: str, auth: LocalAuth) -> list[str]:
    """Show that the predictor's repository calls need a deployer: refused without a token, and with
    the gateway's viewer token; the problems found."""
    viewer = ClientSecurity(token=auth.gateway_token_file.read_text().strip())
    request = grpc_service_pb2.RepositoryModelUnloadRequest(model_name=model)
    problems = []
    with grpc.insecure_channel(predictor) as channel:
        unload = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload
        for who, metadata, expected in (
            ("without a token", (), grpc.StatusCode.UNAUTHENTICATED),
            ("with a viewer token", viewer.metadata(), grpc.StatusCode.PERMISSION_DENIED),
        ):
            try:
                unload(request, metadata=metadata, timeout=10)
                code, details = grpc.StatusCode.OK, "unloaded"
            except grpc.RpcError as err:
                code, details = err.code(), err.details() or ""
            say(f"auth: RepositoryModelUnload {who}: {code.name} ({details})")
            if code != expected:
                problems.append(f"RepositoryModelUnload {who} answered {code.name}, expected {expected.name}")
    return problems


# After up and demo, so `fresco --help` lists those first.
app.command("apply")(apply_command)
app.command("diff")(diff_command)
app.command("audit")(audit_command)

if __name__ == "__main__":
    app()
