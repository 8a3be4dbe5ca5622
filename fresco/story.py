"""`fresco demo`'s story, told against a running platform: register v1 and serve it; train v2, pass its gates
and canary it to 100%; register a deliberately bad v3 and watch it roll back on its own.

Every step goes through the model manager's RPCs, as a user's tooling would; live traffic runs through the
gateway the whole time, so the canaries are judged on what the gateway saw."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from google.protobuf import duration_pb2
from grpc import aio
from rich.console import Console

from fresco.api.features.v1 import statistics_pb2 as spb
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.api.models.v1 import rollout_pb2 as ro
from fresco.cli_manager import TIMEOUT_S, Manager
from fresco.cli_models import sha256_of, upload_requests
from fresco.cli_promote import watch_operation
from fresco.cli_rollout import watch_rollout
from fresco.client import AsyncGatewayClient, predict_request
from fresco.demo import row_features
from fresco.monitoring.training import feature_statistics
from fresco.rollout_view import rollout_summary
from fresco.training import ExportedModel, demo_dataset

MODEL = "demo"
SCHEMA_ONLY = rpb.PromotionGates(schema=rpb.SchemaGate())
UNITS = 1000  # distinct unit ids: the sticky split keeps each on one version


@dataclass
class Tally:
    """What live traffic got back: answers by served version, fallbacks with their reasons, failures."""

    versions: Counter[str] = field(default_factory=Counter)
    fallbacks: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)

    @property
    def answered(self) -> int:
        """Requests that got an answer, from the version chosen or its fallback."""
        return sum(self.versions.values())


class LiveTraffic:
    """Predict calls through the gateway from a background thread until stopped, each with a unit id."""

    def __init__(self, address: str, feature_names: list[str], rows: np.ndarray, concurrency: int = 4) -> None:
        self.address, self.feature_names, self.rows, self.concurrency = address, feature_names, rows, concurrency
        self.tally = Tally()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="live-traffic", daemon=True)

    def __enter__(self) -> LiveTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def snapshot(self) -> Tally:
        """A copy of the tally so far."""
        with self._lock:
            return Tally(Counter(self.tally.versions), Counter(self.tally.fallbacks), Counter(self.tally.failures))

    async def _run(self) -> None:
        async with AsyncGatewayClient(self.address) as client:
            await asyncio.gather(*(self._worker(client, w) for w in range(self.concurrency)))

    async def _worker(self, client: AsyncGatewayClient, worker: int) -> None:
        index = worker
        while not self._stop.is_set():
            row = self.rows[index % len(self.rows)]
            request = predict_request(MODEL, row_features(self.feature_names, row), request_id=str(index))
            request.unit_id = f"user-{index % UNITS}"
            index += self.concurrency
            try:
                response = await client.send(request)
            except aio.AioRpcError as err:
                with self._lock:
                    self.tally.failures[f"{err.code().name}: {err.details()}"] += 1
                await asyncio.sleep(0.05)  # a failing platform is not hammered
                continue
            with self._lock:
                self.tally.versions[response.model_version] += 1
                if response.fallback:
                    self.tally.fallbacks[response.fallback_reason] += 1


def signature(model: ExportedModel) -> rpb.ModelSignature:
    """The demo model's signature: one feature-vector input fed from named features, a label and probabilities."""
    width = len(model.feature_names)
    return rpb.ModelSignature(
        inputs=[rpb.TensorSpec(name=model.input_name, datatype="FP32", shape=[-1, width])],
        outputs=[
            rpb.TensorSpec(name="label", datatype="INT64", shape=[-1]),
            rpb.TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 2]),
        ],
        feature_refs=model.feature_names,
        feature_input=model.input_name,
    )


# Fixed bins for the positive-class probability, so every version's training histogram and the gateways' live
# score histograms share them and the PSI check can compare them.
SCORE_OUTPUT = "probabilities"
SCORE_BOUNDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def score_statistics(path: Path, rows: np.ndarray) -> spb.FeatureStatistics:
    """The training histogram of the version's score (its positive-class probability) over `rows`; rows it fails
    on (the broken v3) are left out, as they yield no score."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: the bad version's failing rows are expected, not news
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    scores = []
    for row in rows:
        try:
            probabilities = session.run([SCORE_OUTPUT], {name: row[None, :].astype(np.float32)})[0]
        except Exception:  # noqa: BLE001  # onnxruntime raises its own error types; the row simply has no score
            continue
        scores.append(float(np.asarray(probabilities)[0, -1]))
    counts = np.bincount(np.searchsorted(SCORE_BOUNDS, scores, side="left"), minlength=len(SCORE_BOUNDS) + 1)
    histogram = spb.Histogram(bucket_bounds=SCORE_BOUNDS, bucket_counts=[int(c) for c in counts])
    if not scores:
        return spb.FeatureStatistics(feature_name=SCORE_OUTPUT, numeric=spb.NumericStatistics(histogram=histogram))
    # The range and the KLL sketch too: drift judges served scores outside [min, max] as out of range.
    stats = feature_statistics(SCORE_OUTPUT, np.asarray(scores, dtype=np.float64))
    stats.numeric.histogram.CopyFrom(histogram)  # the fixed bins routes and the score PSI check share
    return stats


def input_statistics(model: ExportedModel) -> list[spb.FeatureStatistics]:
    """The training statistics of each input feature over the demo's 2,000 training rows, for drift monitoring."""
    rows = demo_dataset(len(model.feature_names)).train_features.astype(np.float64)
    return [feature_statistics(name, rows[:, i]) for i, name in enumerate(model.feature_names)]


def register(m: Manager, model: ExportedModel, path: Path, version: int, why: str, parent: int = 0) -> None:
    """Upload one version's artifact (sha256 checked by the registry) with its signature, lineage, the training
    statistics of its inputs (for drift) and of its score (for the PSI check)."""
    digest, size = sha256_of(path)
    metadata = pb.UploadModelVersionMetadata(
        model_name=MODEL,
        format=rpb.MODEL_FORMAT_ONNX,
        framework="scikit-learn MLP via skl2onnx",
        signature=signature(model),
        expected_sha256=digest,
        expected_size_bytes=size,
        version=version,
        reason=why,
        lineage=rpb.Lineage(parent_version=parent),
        training_statistics=[*input_statistics(model), score_statistics(path, model.sample)],
    )
    reply = m.stub.UploadModelVersion(upload_requests(metadata, path), timeout=TIMEOUT_S, metadata=m.metadata)
    print(f"registered {MODEL} v{reply.model_version.version} (sha256 {reply.model_version.sha256[:12]}…): {why}")


def promote(m: Manager, version: int, gates: rpb.PromotionGates, why: str) -> bool:
    """Run the version's gates to CANDIDATE, printing each result; True when they passed."""
    request = pb.PromoteModelVersionRequest(
        model_name=MODEL, version=version, target_stage=rpb.MODEL_STAGE_CANDIDATE, gates=gates, reason=why
    )
    operation = m.stub.PromoteModelVersion(request, timeout=TIMEOUT_S, metadata=m.metadata).operation
    print(f"promotion gates of v{version}:")
    done = watch_operation(m, operation)
    return done.state == rpb.OPERATION_STATE_SUCCEEDED


def seconds(value: float) -> duration_pb2.Duration:
    """A protobuf Duration."""
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


def deploy(m: Manager, version: int, strategy: ro.RolloutStrategy, why: str) -> ro.Rollout:
    """Apply the model's desired deployment and follow the rollout it starts to its end."""
    deployment = pb.Deployment(model_name=MODEL, version=version, strategy=strategy, replicas=1)
    deployment.auto_rollback.enabled = True
    reply = m.stub.ApplyDeployment(
        pb.ApplyDeploymentRequest(deployment=deployment, reason=why), timeout=TIMEOUT_S, metadata=m.metadata
    )
    print(f"apply {MODEL} v{version}: {pb.ApplyOutcome.Name(reply.outcome)}: {reply.message}")
    done = watch_rollout(m, MODEL, recent_events=0)
    print()  # the live view leaves its cursor at the end of its last line
    return done


def canary(steps: list[float], dwell_s: float, window_s: float) -> ro.RolloutStrategy:
    """A canary through `steps` (percent), judged on server errors and p99 against the baseline."""
    analysis = ro.AnalysisThresholds(max_error_rate=0.05, max_latency_p99_ms=500, min_samples=100)
    strategy = ro.RolloutStrategy(
        canary=ro.CanaryStrategy(
            steps=[ro.CanaryStep(traffic_percent=p, duration=seconds(dwell_s)) for p in steps],
            analysis=analysis,
            analysis_interval=seconds(window_s),
        )
    )
    return strategy


@dataclass(frozen=True)
class Versions:
    """The versions of the story, as written into the demo's model directory."""

    v1: ExportedModel
    v2: ExportedModel
    v3: ExportedModel
    holdout: Path
    v4: ExportedModel | None = None  # the tiny model of the A/B experiment


def act_one(m: Manager, v1: ExportedModel, console: Console) -> list[str]:
    """Register v1, pass its schema gate and serve it blue-green; what went other than told."""
    console.rule("1. register v1 and serve it")
    create = pb.CreateModelRequest(
        model=rpb.Model(name=MODEL, owner="demo-team", description="the demo's 8-feature classifier"),
        reason="the demo's model",
    )
    m.stub.CreateModel(create, timeout=TIMEOUT_S, metadata=m.metadata)
    register(m, v1, v1.path, 1, "first model")
    if not promote(m, 1, SCHEMA_ONLY, "first model: schema gate"):
        return ["v1 did not pass its schema gate"]
    first = deploy(m, 1, ro.RolloutStrategy(blue_green=ro.BlueGreenStrategy()), "serve the first model")
    if first.state != ro.ROLLOUT_STATE_SUCCEEDED:
        return [f"v1 was not served: {rollout_summary(first)}"]
    return []


def acts_two_and_three(
    m: Manager, gateway: str, versions: Versions, rows: np.ndarray, window_s: float, console: Console
) -> list[str]:
    """Canary a better v2 to 100%, then a bad v3 that rolls back on its own, under live traffic; what went other
    than told."""
    problems: list[str] = []
    v1, v2, v3 = versions.v1, versions.v2, versions.v3
    with LiveTraffic(gateway, v1.feature_names, rows) as traffic:
        console.rule("2. train v2, pass its gates, canary it to 100%")
        register(m, v2, v2.path, 2, "wider, regularised network on the same data", parent=1)
        gates = rpb.PromotionGates(
            schema=rpb.SchemaGate(require_output_compatibility=True),
            backtest=rpb.BacktestGate(
                dataset_uri=str(versions.holdout),
                label_column="label",
                metric="auc",
                min_value=0.9,
                max_regression=0.01,
                thresholds=[rpb.MetricThreshold(metric="logloss", max_relative_regression=0.05)],
            ),
            latency=rpb.LatencyGate(p99_budget_ms=250, sample_requests=200),
        )
        if not promote(m, 2, gates, "v2 must beat v1 on the held-out rows and meet the latency budget"):
            problems.append("v2 did not pass its gates")
            return problems
        second = deploy(m, 2, canary([25, 50], 2 * window_s, window_s), "canary v2")
        if second.state != ro.ROLLOUT_STATE_SUCCEEDED:
            problems.append(f"the v2 canary did not succeed: {rollout_summary(second)}")
            return problems
        console.print(f"[green]v2 serves all traffic[/green]: {rollout_summary(second)}")

        console.rule("3. a bad v3 fails on live traffic and is rolled back on its own")
        register(m, v3, v3.path, 3, "deliberately broken: fails at run time on most rows", parent=1)
        if not promote(m, 3, SCHEMA_ONLY, "v3 loads and matches its signature, so its schema gate passes"):
            problems.append("v3 did not pass its schema gate")
            return problems
        third = deploy(m, 3, canary([25, 50], 2 * window_s, window_s), "canary v3")
        if third.state != ro.ROLLOUT_STATE_ROLLED_BACK:
            problems.append(f"the v3 canary was not rolled back: {rollout_summary(third)}")
        else:
            console.print(f"[yellow]v3 rolled back on its own[/yellow]: {third.message}")
        time.sleep(window_s)  # traffic goes on after the rollback, all of it on v2
        seen = traffic.snapshot()
    console.rule("live traffic through the gateway, all three acts")
    console.print(f"answered by version: {dict(sorted(seen.versions.items()))}")
    console.print(f"answered by the fallback version instead: {sum(seen.fallbacks.values())}")
    for reason, count in seen.fallbacks.most_common(3):
        console.print(f"  {count} × {reason}")
    if seen.failures:
        failed = sum(seen.failures.values())
        problems.append(f"{failed} live requests failed, e.g. {seen.failures.most_common(1)[0][0]}")
    if not seen.versions.get("2"):
        problems.append("no live request was answered by v2")
    return problems
