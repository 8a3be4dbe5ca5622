"""`fresco demo`'s fifth act: monitoring that acts. Late labels for the production v2's answers give its live
accuracy and calibration (checked against the same answers computed here); an upstream job starts sending one
feature in cents instead of euros, the drift monitor flags that feature and only it, and the drift gate blocks a
promotion with the reason; the model family's safety score closes the act.

Everything goes through the services' RPCs: the gateway's request ids and prediction records, LogLabels,
GetPredictionQuality, GetModelMonitor, PromoteModelVersion (a dry run) and GetSafetyScore."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from grpc import aio
from rich.console import Console

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import monitoring_pb2 as mpb
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.cli_manager import TIMEOUT_S, Manager
from fresco.cli_promote import watch_operation
from fresco.client import AsyncGatewayClient, outputs, predict_request
from fresco.demo import row_features
from fresco.monitor_view import monitor_view
from fresco.quality_view import quality_view
from fresco.safety_view import safety_table
from fresco.story import MODEL, SCORE_OUTPUT
from fresco.training import ExportedModel

ROWS = 1000  # labelled requests: the held-out rows
DRIFTED_ROWS = 1200  # at least: above the 1,000 values a drift window needs before it is judged
LABEL_BATCH = 400
BROKEN = 2  # the feature whose upstream job switches units
CENTS = 100.0
T = TypeVar("T")


@dataclass(frozen=True)
class Served:
    """One answer: the row it was for, its request id (the gateway's, generated) and the positive-class
    probability."""

    row: int
    request_id: str
    version: str
    score: float


async def _traffic(gateway: str, model: ExportedModel, rows: np.ndarray) -> list[Served]:
    """One Predict per row through the gateway, 8 in flight, without request ids: the gateway makes them."""
    served: list[Served] = []
    todo = iter(range(len(rows)))
    async with AsyncGatewayClient(gateway) as client:

        async def worker() -> None:
            for i in todo:
                request = predict_request(MODEL, row_features(model.feature_names, rows[i]))
                try:
                    response = await client.send(request)
                except aio.AioRpcError:
                    continue  # counted as missing by the caller
                score = float(outputs(response)[SCORE_OUTPUT].reshape(-1)[-1])
                served.append(Served(i, response.request_id, response.model_version, score))

        await asyncio.gather(*(worker() for _ in range(8)))
    return served


def _until(read: Callable[[], T], done: Callable[[T], bool], timeout_s: float = 60.0) -> T | None:
    """The first answer of `read` that is `done` within `timeout_s`, else None."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = read()
        if done(answer):
            return answer
        time.sleep(0.3)
    return None


def _send_labels(m: Manager, served: list[Served], truth: dict[str, int], timeout_s: float = 60.0) -> int:
    """Send every label; those refused because their prediction record has not reached the manager yet (a gateway
    reports its windows every few seconds) are sent again, as a labelling job would. How many were joined."""
    pending = [mpb.Label(request_id=s.request_id, value=float(truth[s.request_id])) for s in served]
    joined, attempt = 0, 0
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        batches = [
            pb.LogLabelsRequest(labels=pending[i : i + LABEL_BATCH], batch_id=f"demo:{attempt}:{i}", model_name=MODEL)
            for i in range(0, len(pending), LABEL_BATCH)
        ]
        acks = {a.batch_id: a for a in m.stub.LogLabels(iter(batches), timeout=TIMEOUT_S, metadata=m.metadata)}
        retry = []
        for batch in batches:
            ack = acks[batch.batch_id]
            joined += ack.accepted
            unknown = {r.index for r in ack.rejected if r.reason == mpb.LABEL_REJECTION_UNKNOWN_REQUEST}
            retry += [label for i, label in enumerate(batch.labels) if i in unknown]
        pending, attempt = retry, attempt + 1
        if pending:
            time.sleep(0.5)
    return joined


def late_labels(m: Manager, gateway: str, model: ExportedModel, rows: np.ndarray, labels: np.ndarray,
                console: Console) -> list[str]:  # fmt: skip
    """Serve held-out rows, send their labels afterwards, and compare the live accuracy with this side's."""

    def quality() -> pb.GetPredictionQualityResponse:
        request = pb.GetPredictionQualityRequest(model_name=MODEL)
        return m.stub.GetPredictionQuality(request, timeout=TIMEOUT_S, metadata=m.metadata)

    def kept(answer: pb.GetPredictionQualityResponse) -> tuple[int, int]:
        """Predictions kept and labelled, over every version."""
        windows = [w for v in answer.versions for w in v.windows if w.window == "all"]
        return sum(w.predictions for w in windows), sum(w.labelled for w in windows)

    before = kept(quality())[1]
    served = asyncio.run(_traffic(gateway, model, rows[:ROWS]))
    if len(served) != ROWS:
        return [f"{ROWS - len(served)} of {ROWS} labelled requests failed"]
    truth = {s.request_id: int(labels[s.row]) for s in served}  # answers come back in any order
    version = served[0].version
    if {s.version for s in served} != {version}:
        return [f"the labelled traffic was answered by several versions: {sorted({s.version for s in served})}"]
    # The labels come later, once the gateway's windows have brought the prediction records to the manager.
    accepted = _send_labels(m, served, truth)
    console.print(f"{ROWS} answers of v{version}; their labels arrived afterwards: {accepted} joined by request id")
    problems = [] if accepted == ROWS else [f"only {accepted} of {ROWS} labels were joined to a prediction"]

    answer = _until(quality, lambda a: kept(a)[1] >= before + ROWS) or quality()
    judged = [v for v in answer.versions if v.version == int(version)]
    console.print(quality_view(MODEL, pb.GetPredictionQualityResponse(versions=judged)))
    window = next((w for v in judged for w in v.windows if w.window == "all"), None)
    scores = np.asarray([s.score for s in served])
    truths = np.asarray([truth[s.request_id] for s in served])
    mine = float(np.mean((scores >= 0.5) == (truths == 1)))
    live = window.metrics.get("accuracy") if window is not None else None
    console.print(f"accuracy computed here from the same answers and labels: {mine:.4f}; the manager's: {live}")
    if live is None or abs(live - mine) > 1e-9:
        problems.append(f"the live accuracy {live} differs from the offline {mine:.6f}")
    return problems


def drift(
    m: Manager, gateway: str, model: ExportedModel, rows: np.ndarray, candidate: int, console: Console
) -> list[str]:
    """Send rows whose one feature arrives in cents, watch the monitor flag it, and see the drift gate refuse a
    promotion (a dry run: nothing changes)."""
    name = model.feature_names[BROKEN]

    # The gate judges the model's inputs over the last hour, every version's traffic merged: so that the broken
    # share stands above the 5% out-of-range limit however long the earlier acts ran, send at least 15% more.
    def everyone() -> pb.GetModelMonitorResponse:
        request = pb.GetModelMonitorRequest(model_name=MODEL)
        return m.stub.GetModelMonitor(request, timeout=TIMEOUT_S, metadata=m.metadata)

    def hour_of(answer: pb.GetModelMonitorResponse) -> int:
        """The values of the broken feature in the hour the gate judges, every version merged."""
        return sum(w.count for v in answer.versions for f in v.features if f.name == name for w in f.windows
                   if w.window == "1h")  # fmt: skip

    hour = hour_of(everyone())
    count = max(DRIFTED_ROWS, math.ceil(0.15 * hour))
    broken = np.resize(rows, (count, rows.shape[1]))
    broken[:, BROKEN] *= CENTS
    console.print(f"an upstream job now sends {name} in cents, not euros: {count} more requests")
    served = asyncio.run(_traffic(gateway, model, broken))
    problems = [] if len(served) == count else [f"{count - len(served)} of {count} drifted requests failed"]
    version = int(served[0].version) if served else 0

    # Every broken row reported (the gate then judges them all), and the serving version's monitor flagging it.
    def arrived(answer: pb.GetModelMonitorResponse) -> bool:
        flagged = any(v.version == version and name in v.drifted_features for v in answer.versions)
        return flagged and hour_of(answer) >= hour + len(served)

    everything = _until(everyone, arrived) or everyone()
    answer = pb.GetModelMonitorResponse(versions=[v for v in everything.versions if v.version == version])
    answer.notes.extend(everything.notes)
    console.print(monitor_view(MODEL, answer))
    drifted = {f for v in answer.versions for f in v.drifted_features}
    inputs = drifted & set(model.feature_names)
    if inputs != {name}:
        problems.append(f"the monitor flagged inputs {sorted(inputs)}, not just {name}")
    request = pb.PromoteModelVersionRequest(
        model_name=MODEL, version=candidate, target_stage=rpb.MODEL_STAGE_PRODUCTION, dry_run=True,
        gates=rpb.PromotionGates(drift=rpb.DriftGate(window="1h")),
        reason="would v4 be promoted while its inputs drift?",
    )  # fmt: skip
    operation = m.stub.PromoteModelVersion(request, timeout=TIMEOUT_S, metadata=m.metadata).operation
    console.print(f"promoting v{candidate} to production (dry run), drift gate only:")
    done = watch_operation(m, operation)
    details = " ".join(r.detail for r in done.gate_results if not r.passed)
    if done.passed or name not in details:  # a dry run succeeds as an operation; `passed` is the gates' verdict
        problems.append(f"the drift gate did not block v{candidate} naming {name}: {details or done.error}")
    else:
        console.print(
            f"[red]blocked[/red]: the drift gate names {name}; `force` with a reason would override it, audited"
        )
    return problems


def act_five(m: Manager, gateway: str, model: ExportedModel, rows: np.ndarray, labels: np.ndarray, candidate: int,
             console: Console) -> list[str]:  # fmt: skip
    """Late labels, drift, a blocked promotion and the safety score. What went other than told."""
    console.rule("5. monitoring that acts: late labels, drift on one feature, a blocked promotion, the safety score")
    problems = late_labels(m, gateway, model, rows, labels, console)
    if not problems:
        problems += drift(m, gateway, model, rows, candidate, console)
    score = m.stub.GetSafetyScore(pb.GetSafetyScoreRequest(model_name=MODEL), timeout=TIMEOUT_S, metadata=m.metadata)
    console.print(safety_table(score.safety_score))
    return problems
