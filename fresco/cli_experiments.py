"""`fresco experiments`: create experiments from YAML files, list and show them, start, stop and re-weight them,
read their results (and plot their lift over time), and take decisions."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import typer
from google.protobuf import field_mask_pb2
from rich.console import Console
from rich.markup import escape

from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.api.experiments.v1 import experiment_service_pb2 as spb
from fresco.api.experiments.v1 import experiment_service_pb2_grpc as spb_grpc
from fresco.cli_manager import TIMEOUT_S, Metadata, TokenFileOption, open_channel
from fresco.experiments_file import TEMPLATES, ExperimentFileError, load
from fresco.experiments_view import (
    decision_record_text,
    experiment_summary,
    experiment_view,
    experiments_table,
    status_name,
)
from fresco.results_plot import plot_history
from fresco.results_view import results_view

app = typer.Typer(
    help="Experiments: create them from YAML, list, show, start, stop, re-weight; read results; decide.",
    no_args_is_help=True,
)
console = Console()
errors = Console(stderr=True)

ServiceOption = Annotated[
    str,
    typer.Option(
        "--service", "--address", envvar="FRESCO_EXPERIMENT_SERVICE", help="host:port of the experiment service."
    ),
]
KeyArgument = Annotated[str, typer.Argument(help="Experiment key.")]
ExpectedVersionOption = Annotated[
    int,
    typer.Option(
        min=0, help="Refuse the change (ABORTED) unless the experiment is at this version; 0 reads the current one."
    ),
]
STATUSES = ("draft", "running", "stopped", "decided")
Action = Literal["ship", "keep"]
ACTIONS = {"ship": xpb.DECISION_ACTION_SHIP_TREATMENT, "keep": xpb.DECISION_ACTION_KEEP_CONTROL}
PAGE_SIZE = 100


@dataclass(frozen=True)
class Experiments:
    """A blocking stub of the experiment service and the per-call metadata carrying the token."""

    stub: spb_grpc.ExperimentServiceStub
    metadata: Metadata

    def get(self, key: str) -> xpb.Experiment:
        """The experiment, or NOT_FOUND."""
        request = spb.GetExperimentRequest(key=key)
        return self.stub.GetExperiment(request, timeout=TIMEOUT_S, metadata=self.metadata).experiment

    def version(self, key: str, expected: int) -> int:
        """`expected` when given, else the experiment's current version."""
        return expected or self.get(key).version


@contextmanager
def connect(address: str, token_file: Path | None, what: str) -> Iterator[Experiments]:
    """The experiment service for the body of the block; a gRPC error in it is printed and exits 1."""
    with open_channel(address, token_file, what) as (channel, metadata):
        yield Experiments(spb_grpc.ExperimentServiceStub(channel), metadata)


@app.callback()
def experiments() -> None:
    """Experiments: create them from YAML, list, show, start, stop, re-weight; read results; decide."""


@app.command()
def create(
    file: Annotated[Path, typer.Argument(help="Experiment YAML file (see examples/experiments).")],
    service: ServiceOption,
    token_file: TokenFileOption = None,
    template: Annotated[
        str | None, typer.Option(help=f"Fill defaults from a template ({', '.join(TEMPLATES)}).", show_default=False)
    ] = None,
    start: Annotated[bool, typer.Option("--start", help="Start it right after creating it.")] = False,
) -> None:
    """Create an experiment in DRAFT from a file (checked before any call); --start starts it too."""
    try:
        experiment = load(file, template)
    except ExperimentFileError as err:
        errors.print(f"[red]{escape(str(file))} is not a valid experiment file:[/red]")
        for problem in err.problems:
            errors.print(f"  {escape(problem)}", highlight=False)
        raise typer.Exit(2) from None
    with connect(service, token_file, "create") as x:
        request = spb.CreateExperimentRequest(experiment=experiment)
        created = x.stub.CreateExperiment(request, timeout=TIMEOUT_S, metadata=x.metadata).experiment
        console.print(f"created {escape(experiment_summary(created))}", highlight=False)
        if start:
            started = spb.StartExperimentRequest(key=created.key, expected_version=created.version)
            running = x.stub.StartExperiment(started, timeout=TIMEOUT_S, metadata=x.metadata).experiment
            console.print(f"started {escape(experiment_summary(running))}", highlight=False)


@app.command("list")
def list_experiments(
    service: ServiceOption,
    token_file: TokenFileOption = None,
    status: Annotated[
        list[str] | None, typer.Option(help=f"Only experiments in this status ({', '.join(STATUSES)}); repeat.")
    ] = None,
    model: Annotated[str, typer.Option(help="Only experiments on this model.")] = "",
) -> None:
    """Experiments by key: status, type, model, arms and weights, coverage, phase, version, owner."""
    for given in status or []:
        if given not in STATUSES:
            raise typer.BadParameter(f"expected one of {', '.join(STATUSES)}, got {given!r}", param_hint="--status")
    statuses = [xpb.ExperimentStatus.Value(f"EXPERIMENT_STATUS_{s.upper()}") for s in status or []]
    found: list[xpb.Experiment] = []
    with connect(service, token_file, "list") as x:
        token = ""
        while True:
            request = spb.ListExperimentsRequest(
                statuses=statuses, model_name=model, page_size=PAGE_SIZE, page_token=token
            )
            page = x.stub.ListExperiments(request, timeout=TIMEOUT_S, metadata=x.metadata)
            found.extend(page.experiments)
            token = page.next_page_token
            if not token:
                break
    console.print(experiments_table(found))


@app.command()
def show(key: KeyArgument, service: ServiceOption, token_file: TokenFileOption = None) -> None:
    """An experiment: configuration, status, arms, metrics, decision rule, phases and its audit log."""
    with connect(service, token_file, "show") as x:
        experiment = x.get(key)
        audit = spb.ListAuditEntriesRequest(key=key)
        entries = x.stub.ListAuditEntries(audit, timeout=TIMEOUT_S, metadata=x.metadata).entries
    console.print(experiment_view(experiment, entries))


@app.command()
def start(
    key: KeyArgument,
    service: ServiceOption,
    token_file: TokenFileOption = None,
    expected_version: ExpectedVersionOption = 0,
) -> None:
    """Start a DRAFT experiment: gateways begin assigning units to its arms."""
    with connect(service, token_file, "start") as x:
        request = spb.StartExperimentRequest(key=key, expected_version=x.version(key, expected_version))
        running = x.stub.StartExperiment(request, timeout=TIMEOUT_S, metadata=x.metadata).experiment
    console.print(f"started {escape(experiment_summary(running))}", highlight=False)


@app.command()
def stop(
    key: KeyArgument,
    service: ServiceOption,
    token_file: TokenFileOption = None,
    reason: Annotated[str, typer.Option(help="Why, for the experiment and its audit log.")] = "",
    expected_version: ExpectedVersionOption = 0,
) -> None:
    """Stop a RUNNING experiment: gateways stop assigning it; results stay readable and a decision may follow."""
    with connect(service, token_file, "stop") as x:
        version = x.version(key, expected_version)
        request = spb.StopExperimentRequest(key=key, expected_version=version, reason=reason)
        stopped = x.stub.StopExperiment(request, timeout=TIMEOUT_S, metadata=x.metadata).experiment
    console.print(f"stopped {escape(experiment_summary(stopped))}", highlight=False)


def parse_weights(text: str, arms: list[str]) -> dict[str, float]:
    """`a=0.5,b=0.5` as {arm: weight}; a usage error names an unknown arm or a bad number."""
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise typer.BadParameter(f"expected ARM=WEIGHT, got {item!r}", param_hint="--weights")
        if name not in arms:
            expected = f"expected one of the arms ({', '.join(arms)}), got {name!r}"
            raise typer.BadParameter(expected, param_hint="--weights")
        try:
            weights[name] = float(value)
        except ValueError:
            raise typer.BadParameter(f"expected a number for {name}, got {value!r}", param_hint="--weights") from None
    if not weights:
        raise typer.BadParameter("expected ARM=WEIGHT[,ARM=WEIGHT...]", param_hint="--weights")
    return weights


@app.command()
def update(
    key: KeyArgument,
    service: ServiceOption,
    token_file: TokenFileOption = None,
    weights: Annotated[
        str | None,
        typer.Option(help="New arm weights, e.g. control=0.5,treatment=0.5 (unnamed arms keep theirs); a new phase."),
    ] = None,
    coverage: Annotated[
        float | None, typer.Option(help="New coverage in (0, 1]; growing it moves no unit already in.")
    ] = None,
    expected_version: ExpectedVersionOption = 0,
) -> None:
    """Change an experiment's weights or coverage, guarded by its current version (or --expected-version)."""
    if weights is None and coverage is None:
        raise typer.BadParameter("give --weights, --coverage or both", param_hint="--weights/--coverage")
    with connect(service, token_file, "update") as x:
        experiment = x.get(key)
        paths = []
        if weights is not None:
            new = parse_weights(weights, [arm.name for arm in experiment.arms])
            for arm in experiment.arms:
                arm.weight = new.get(arm.name, arm.weight)
            paths.append("arms")
        if coverage is not None:
            experiment.coverage = coverage
            paths.append("coverage")
        request = spb.UpdateExperimentRequest(
            experiment=experiment,
            update_mask=field_mask_pb2.FieldMask(paths=paths),
            expected_version=expected_version or experiment.version,
        )
        response = x.stub.UpdateExperiment(request, timeout=TIMEOUT_S, metadata=x.metadata)
    changed = response.experiment
    phase = f"; phase {changed.phases[-1].number} started" if response.new_phase and changed.phases else ""
    console.print(f"updated {escape(experiment_summary(changed))}{phase}", highlight=False)


@app.command()
def results(
    key: KeyArgument,
    service: ServiceOption,
    token_file: TokenFileOption = None,
    phase: Annotated[int, typer.Option(min=0, help="Phase to analyse; 0 is the current (or last) one.")] = 0,
    plot: Annotated[
        Path | None, typer.Option(help="Also draw the lift and its confidence sequence over time into this PNG.")
    ] = None,
    metric: Annotated[str, typer.Option(help="With --plot: the metric drawn (default: the first).")] = "",
) -> None:
    """The analysis of one phase: arms, each metric's lift with its interval and confidence sequence, p-values,
    CUPED, non-inferiority, the sample-ratio check and the decision with every check."""
    with connect(service, token_file, "results") as x:
        request = spb.GetResultsRequest(key=key, phase=phase)
        analysed = x.stub.GetResults(request, timeout=TIMEOUT_S, metadata=x.metadata).results
        console.print(results_view(analysed))
        if plot is None:
            return
        experiment = x.get(key)
        specs = {m.name: m for m in experiment.metrics}
        drawn = metric or (experiment.metrics[0].name if experiment.metrics else "")
        history = spb.GetResultsHistoryRequest(key=key, phase=analysed.phase, metric=drawn)
        points = x.stub.GetResultsHistory(history, timeout=TIMEOUT_S, metadata=x.metadata).points
    spec = specs.get(drawn, xpb.MetricSpec(name=drawn))
    title = f"{key} phase {analysed.phase}: {drawn} lift vs {analysed.control_arm}"
    try:
        arms = plot_history(points, plot, title, spec.minimum_detectable_effect, spec.direction)
    except (ValueError, OSError) as err:
        errors.print(f"[red]plot failed:[/red] {escape(str(err))}")
        raise typer.Exit(1) from None
    console.print(f"plotted {drawn} for {arms} treatment arm(s), {len(points)} points: {plot}", highlight=False)


@app.command()
def decide(
    key: KeyArgument,
    service: ServiceOption,
    token_file: TokenFileOption = None,
    action: Annotated[
        Action | None, typer.Option(help="Override the recommendation: ship an arm or keep control (needs --reason).")
    ] = None,
    arm: Annotated[str, typer.Option(help="With --action ship: the arm whose version is promoted.")] = "",
    reason: Annotated[str, typer.Option(help="Why; required to override the recommendation.")] = "",
    expected_version: ExpectedVersionOption = 0,
) -> None:
    """Take the decision: the results' recommendation, or --action; shipping promotes the arm's version through
    the model manager's gates and rollout."""
    if action == "ship" and not arm:
        raise typer.BadParameter("--action ship needs --arm", param_hint="--arm")
    if action is not None and not reason.strip():
        raise typer.BadParameter("an override needs a --reason, which the audit log keeps", param_hint="--reason")
    with connect(service, token_file, "decide") as x:
        request = spb.DecideExperimentRequest(
            key=key,
            expected_version=x.version(key, expected_version),
            action=ACTIONS[action] if action else xpb.DECISION_ACTION_UNSPECIFIED,
            arm=arm,
            reason=reason,
        )
        response = x.stub.DecideExperiment(request, timeout=TIMEOUT_S, metadata=x.metadata)
    if response.HasField("results"):
        console.print(results_view(response.results))
    decided = response.experiment
    console.print(
        f"{escape(decided.key)} {status_name(decided.status)}: {escape(decision_record_text(decided.decision))}",
        highlight=False,
    )
