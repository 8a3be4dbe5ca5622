"""`fresco demo`'s fourth act: an A/B experiment between the production v2 and a tiny v4, assigned by the gateway,
judged on accuracy (whether each answer matched the held-out label) and latency, decided by Michelangelo's rule.

Every step goes through the services' RPCs as a user's tooling would: the experiment service holds both arms'
versions in the model manager, the gateway assigns each unit locally and routes it to its arm's version, exposures
flow from the gateway, the outcomes are logged over LogOutcomes, and the decision is taken on the results."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from google.protobuf import duration_pb2
from grpc import aio
from rich.console import Console

from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.api.experiments.v1 import experiment_service_pb2 as spb
from fresco.cli_experiments import Experiments
from fresco.cli_manager import TIMEOUT_S, Manager
from fresco.client import AsyncGatewayClient, outputs, predict_request
from fresco.demo import row_features
from fresco.experiments_view import decision_record_text
from fresco.results_view import results_view
from fresco.story import MODEL, SCHEMA_ONLY, promote, register
from fresco.training import ExportedModel

KEY = "demo-tiny-v4"
UNITS = 1500  # distinct users, one request each
MIN_UNITS = 400  # per arm, before the rule may decide anything but CONTINUE
OUTCOME_BATCH = 250


@dataclass(frozen=True)
class Answer:
    """One unit's request: its arm, the version that answered, whether it was right, how long it took."""

    unit: str
    arm: str
    version: str
    exposed: bool
    correct: bool
    latency_ms: float


def experiment() -> xpb.Experiment:
    """v2 (control, production) against v4 (treatment) half and half, by user, on Michelangelo's rule: accuracy
    +2% and latency regression under 10%."""
    e = xpb.Experiment(
        key=KEY,
        hypothesis="a 2-unit network, far cheaper to serve, answers as accurately as v2",
        owner="demo-team",
        model_name=MODEL,
        unit_type="user_id",
        coverage=1.0,
        control_arm="v2",
        min_units_per_arm=MIN_UNITS,
        max_duration=duration_pb2.Duration(seconds=14 * 86_400),
    )
    e.arms.add(name="v2", weight=0.5, model_version=2, description="production")
    e.arms.add(name="v4-tiny", weight=0.5, model_version=4, description="2 hidden units")
    e.metrics.add(
        name="accuracy",
        role=xpb.METRIC_ROLE_SUCCESS,
        kind=xpb.METRIC_KIND_PROPORTION,
        event="correct",
        minimum_detectable_effect=0.02,
    )
    e.metrics.add(
        name="latency_ms",
        role=xpb.METRIC_ROLE_LATENCY,
        kind=xpb.METRIC_KIND_MEAN,
        direction=xpb.METRIC_DIRECTION_DECREASE,
        event="latency_ms",
        non_inferiority_margin=0.10,
    )
    return e


async def _traffic(gateway: str, model: ExportedModel, rows: np.ndarray, labels: np.ndarray) -> list[Answer]:
    """One Predict per unit through the gateway, 8 in flight; each answer checked against its row's label."""
    answers: list[Answer] = []
    units = iter(range(UNITS))
    async with AsyncGatewayClient(gateway) as client:

        async def worker() -> None:
            for i in units:
                row = i % len(rows)
                unit = f"user-{i}"
                request = predict_request(
                    MODEL, row_features(model.feature_names, rows[row]), unit_ids={"user_id": unit}
                )
                start = time.perf_counter()
                try:
                    response = await client.send(request)
                except aio.AioRpcError:
                    continue  # counted as missing below
                latency = (time.perf_counter() - start) * 1000.0
                label = int(outputs(response)["label"].reshape(-1)[0])
                arm = response.experiments[0] if response.experiments else None
                answers.append(
                    Answer(
                        unit,
                        arm.arm if arm else "",
                        response.model_version,
                        bool(arm and arm.exposed),
                        label == int(labels[row]),
                        latency,
                    )
                )

        await asyncio.gather(*(worker() for _ in range(8)))
    return answers


def _outcomes(answers: list[Answer]) -> list[spb.LogOutcomesRequest]:
    """Each exposed unit's outcomes (a correct answer, its latency) in acknowledged batches."""
    rows = []
    for a in answers:
        if not a.exposed:
            continue
        rows.append(_outcome(a.unit, "latency_ms", a.latency_ms))
        if a.correct:
            rows.append(_outcome(a.unit, "correct", 1.0))
    return [
        spb.LogOutcomesRequest(batch_id=f"batch-{i // OUTCOME_BATCH}", outcomes=rows[i : i + OUTCOME_BATCH])
        for i in range(0, len(rows), OUTCOME_BATCH)
    ]


def _outcome(unit: str, event: str, value: float) -> apb.Outcome:
    return apb.Outcome(
        outcome_id=f"{unit}:{event}", experiment_key=KEY, unit_type="user_id", unit_id=unit, event=event, value=value
    )


def _wait(check: Callable[[], bool], timeout_s: float = 60.0) -> bool:
    """Whether `check` came true within `timeout_s` (a generous bound for a loaded machine)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def act_four(
    m: Manager, x: Experiments, gateway: str, v4: ExportedModel, rows: np.ndarray, labels: np.ndarray,
    console: Console,
) -> list[str]:  # fmt: skip
    """Register a tiny v4 and run an A/B experiment of it against v2 through the gateway; print the results and the
    decision. What went other than told."""
    console.rule("4. an A/B experiment: the production v2 against a tiny v4")
    register(m, v4, v4.path, 4, "a 2-unit network: far cheaper, is it as accurate?", parent=2)
    if not promote(m, 4, SCHEMA_ONLY, "v4 loads and matches its signature"):
        return ["v4 did not pass its schema gate"]
    created = x.stub.CreateExperiment(
        spb.CreateExperimentRequest(experiment=experiment()), timeout=TIMEOUT_S, metadata=x.metadata
    ).experiment
    started = x.stub.StartExperiment(
        spb.StartExperimentRequest(key=KEY, expected_version=created.version), timeout=TIMEOUT_S, metadata=x.metadata
    ).experiment
    console.print(f"experiment {KEY} running: arms v2 (control) and v4-tiny, half the users each, by user_id")

    def routed() -> bool:  # the gateway has the experiment and the route holds v4 warm at weight 0
        probe = asyncio.run(_traffic_probe(gateway, v4, rows))
        return probe == {"2", "4"}

    if not _wait(routed):
        return ["the gateway never routed both arms of the experiment"]
    answers = asyncio.run(_traffic(gateway, v4, rows, labels))
    seen = Counter((a.arm, a.version) for a in answers if a.exposed)
    console.print(f"{len(answers)} users answered; by arm and version: {dict(sorted(seen.items()))}")
    problems = [] if len(answers) == UNITS else [f"{UNITS - len(answers)} experiment requests failed"]
    if any((arm, version) not in {("v2", "2"), ("v4-tiny", "4")} for arm, version in seen):
        problems.append(f"an arm was answered by another version: {dict(seen)}")
    exposed = sum(seen.values())

    def results() -> spb.GetResultsResponse:
        return x.stub.GetResults(spb.GetResultsRequest(key=KEY), timeout=TIMEOUT_S, metadata=x.metadata)

    if not _wait(lambda: sum(a.units for a in results().results.arms) >= exposed):
        problems.append("the gateway's exposures did not all reach the experiment service")
    acks = list(x.stub.LogOutcomes(iter(_outcomes(answers)), timeout=TIMEOUT_S, metadata=x.metadata))
    refused = sum(len(a.rejections) for a in acks)
    console.print(f"outcomes logged: {sum(a.accepted for a in acks)} accepted in {len(acks)} acknowledged batches")
    if refused:
        problems.append(f"{refused} outcomes were refused, e.g. {acks[0].rejections[0].detail if acks else ''}")
    console.print(results_view(results().results))
    decided = x.stub.DecideExperiment(
        spb.DecideExperimentRequest(key=KEY, expected_version=started.version), timeout=TIMEOUT_S, metadata=x.metadata
    ).experiment
    console.print(f"decision: {decision_record_text(decided.decision)}")
    if decided.decision.action != xpb.DECISION_ACTION_KEEP_CONTROL:
        problems.append(f"the experiment decided {xpb.DecisionAction.Name(decided.decision.action)}, not KEEP_CONTROL")
    return problems


async def _traffic_probe(gateway: str, model: ExportedModel, rows: np.ndarray) -> set[str]:
    """The versions that answered the exposed requests of the first 20 users (the same rows the traffic sends)."""
    seen = set()
    async with AsyncGatewayClient(gateway) as client:
        for i in range(20):
            features = row_features(model.feature_names, rows[i % len(rows)])
            request = predict_request(MODEL, features, unit_ids={"user_id": f"user-{i}"})  # users of the traffic
            response = await client.send(request)
            if response.experiments and response.experiments[0].exposed:
                seen.add(response.model_version)
    return seen
