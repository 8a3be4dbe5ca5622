"""The whole platform scraped by a real Prometheus: the model manager, a predictor, the experiment service, the
gateway (fresco.suite.start_platform) and a feature service on its embedded SQLite store, every one's /metrics
scraped each second; the shipped alert rules loaded with their `for:` shortened to seconds."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from chassis.server import channel_options
from chassis.settings import DEFAULT_MAX_MESSAGE_BYTES
from fresco.api.common.v1 import values_pb2
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.api.experiments.v1 import experiment_service_pb2 as epb
from fresco.api.experiments.v1 import experiment_service_pb2_grpc as epb_grpc
from fresco.api.features.v1 import feature_service_pb2 as fpb
from fresco.api.features.v1 import feature_service_pb2_grpc as fpb_grpc
from fresco.api.gateway.v1 import gateway_pb2 as gpb
from fresco.api.gateway.v1 import gateway_pb2_grpc as gpb_grpc
from fresco.api.models.v1 import model_manager_service_pb2 as mpb
from fresco.api.models.v1 import monitoring_pb2 as monpb
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.cli_manager import Manager
from fresco.cli_models import sha256_of, upload_requests
from fresco.client import predict_request
from fresco.monitoring.training import feature_statistics
from fresco.servers import PrometheusServer
from fresco.servers.prometheus import fast_rules, scrape_target
from fresco.story import score_statistics, signature
from fresco.suite import LocalAuth, ServiceProcess, Suite
from fresco.training import ExportedModel, demo_dataset

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
FAST_FOR_S = 4.0  # every alert's `for:` in the running Prometheus
T = TypeVar("T")

FEATURES = """
entities:
  - name: user
    join_keys: [{name: user_id, type: int64}]
feature_views:
  - name: user_stats
    entities: [user]
    features:
      - {name: visits, type: double}
      - {name: spend, type: double}
"""


@dataclass(frozen=True)
class World:
    """The running platform, its admin's credentials and the Prometheus scraping it."""

    suite: Suite
    auth: LocalAuth
    prometheus: PrometheusServer
    root: Path


def start_feature_service(suite: Suite, root: Path, auth: LocalAuth) -> ServiceProcess:
    """A feature service with one view, added to the suite (so it stops with it)."""
    (root / "features.yaml").write_text(FEATURES)
    args = ["--definitions", str(root / "features.yaml"), "--sqlite-path", str(root / "features.db"), "--port", "0"]
    args += ["--materialize-source-dirs", str(root), "--parity-sample-rate", "1"]  # every served entity checked
    return suite.start(
        ServiceProcess("feature_service", [*args, *auth.service_args()], log_path=root / "feature_service.log")
    )


def start_prometheus(suite: Suite, root: Path) -> PrometheusServer:
    """Prometheus scraping every service of the suite (job = module), with the fast copy of the alert rules."""
    rules = fast_rules(RULES, root / "alerts-fast.yml", for_s=FAST_FOR_S)
    targets = {service.module: [scrape_target(service.metrics_url)] for service in suite.services}
    assert all(targets.values()), targets
    return PrometheusServer(targets, [rules], data_dir=root / "prometheus").start()


def user(user_id: int) -> values_pb2.EntityKey:
    return values_pb2.EntityKey(join_keys={"user_id": values_pb2.Value(int64_value=user_id)})


def fetch_features(world: World, root: Path, users: int = 20, reads: int = 10) -> None:
    """Materialise `users` rows from a Parquet file, push two more users, then read them all `reads` times: the
    memory tier misses once per key, then hits; the parity check compares every served entity with the file."""
    now = time.time()
    table = pa.Table.from_pylist(
        [{"user_id": u, "visits": float(u), "spend": 2.0 * u, "event_timestamp": now - 60} for u in range(users)],
        schema=pa.schema([("user_id", pa.int64()), ("visits", pa.float64()), ("spend", pa.float64()),
                          ("event_timestamp", pa.float64())]),
    )  # fmt: skip
    pq.write_table(table, root / "users.parquet")
    address = world.suite.service("feature_service").address
    with world.auth.admin.channel(address, channel_options(DEFAULT_MAX_MESSAGE_BYTES)) as channel:
        stub = fpb_grpc.FeatureServiceStub(channel)
        metadata = world.auth.admin.metadata()
        materialized = stub.Materialize(
            fpb.MaterializeRequest(feature_view="user_stats", source_uri=str(root / "users.parquet")),
            timeout=60,
            metadata=metadata,
        )
        assert (materialized.rows_written, materialized.rows_rejected) == (users, 0)
        rows = [
            fpb.FeatureRow(
                entity_key=user(u),
                features={"visits": values_pb2.Value(double_value=u), "spend": values_pb2.Value(double_value=2.0 * u)},
            )
            for u in (users, users + 1)
        ]
        pushed = stub.PushFeatures(iter([fpb.PushFeaturesRequest(feature_view="user_stats", rows=rows)]),
                                   timeout=30, metadata=metadata)  # fmt: skip
        assert (pushed.accepted_count, pushed.rejected_count) == (2, 0)
        request = fpb.GetFeaturesRequest(
            entity_keys=[user(u) for u in range(users + 4)],  # two unknown users: not_found values too
            feature_refs=["user_stats:visits", "user_stats:spend"],
        )
        for _ in range(reads):
            stub.GetFeatures(request, timeout=30, metadata=metadata)


def ab_experiment(key: str, model: str) -> xpb.Experiment:
    """A 50/50 test of v1 against v2 of `model`, units by user id."""
    e = xpb.Experiment(
        key=key, hypothesis="v2 converts better than v1", model_name=model, unit_type="user_id", coverage=1.0,
        min_units_per_arm=100,
    )  # fmt: skip
    e.arms.add(name="control", weight=0.5, model_version=1)
    e.arms.add(name="treatment", weight=0.5, model_version=2)
    e.metrics.add(
        name="converted", kind=xpb.METRIC_KIND_PROPORTION, event="purchase", role=xpb.METRIC_ROLE_SUCCESS,
        minimum_detectable_effect=0.02,
    )  # fmt: skip
    return e


def wait_for(read: Callable[[], T], done: Callable[[T], bool], timeout_s: float, what: str) -> T:
    """Call `read` until `done` holds on its value; fail naming `what` and the last value past the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen within {timeout_s}s; last:\n{value}")
        time.sleep(0.1)


def series(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """The result of a successful query answer; [] for an error."""
    if answer.get("status") != "success":
        return []
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def run_experiment(world: World, model: str, feature_names: list[str], rows: Any, units: int = 200) -> int:
    """Start an A/B test of v1 against v2 of `model` (v1 serving, v2 registered) and send `units` users through the
    gateway once both arms answer; returns how many distinct users were exposed (each is one exposure)."""
    options = channel_options(DEFAULT_MAX_MESSAGE_BYTES)
    metadata = world.auth.admin.metadata()
    key = "dash-ab"
    exposed: set[int] = set()
    with (
        world.auth.admin.channel(world.suite.service("experiment_service").address, options) as channel,
        world.auth.admin.channel(world.suite.service("gateway").address, options) as gateway_channel,
    ):
        experiments = epb_grpc.ExperimentServiceStub(channel)
        created = experiments.CreateExperiment(
            epb.CreateExperimentRequest(experiment=ab_experiment(key, model)), metadata=metadata
        ).experiment
        experiments.StartExperiment(
            epb.StartExperimentRequest(key=key, expected_version=created.version), metadata=metadata
        )
        gateway = gpb_grpc.GatewayServiceStub(gateway_channel)

        def predict(unit: int) -> gpb.PredictResponse:
            features = {name: float(v) for name, v in zip(feature_names, rows[unit % len(rows)], strict=True)}
            request = predict_request(model, features, unit_ids={"user_id": f"u{unit}"})
            answer: gpb.PredictResponse = gateway.Predict(request, timeout=30, metadata=metadata)
            if answer.experiments and answer.experiments[0].exposed:
                exposed.add(unit)
            return answer

        # The gateway follows the experiment (and the route holding v2) within moments of the start.
        wait_for(
            lambda: [predict(u) for u in range(10)],
            lambda answers: any(a.experiments and a.experiments[0].exposed and a.model_version == "2" for a in answers),
            60,
            "the experiment's treatment arm answering",
        )
        for unit in range(units):
            predict(unit)
    return len(exposed)


def register_with_statistics(m: Manager, name: str, model: ExportedModel, version: int, train: np.ndarray) -> None:
    """Upload a version with the training statistics of each input feature and of its score: the basis the model
    manager measures drift against."""
    statistics = [feature_statistics(n, train[:, i].astype(np.float64)) for i, n in enumerate(model.feature_names)]
    statistics.append(score_statistics(model.path, model.sample))
    digest, size = sha256_of(model.path)
    metadata = mpb.UploadModelVersionMetadata(
        model_name=name,
        format=rpb.MODEL_FORMAT_ONNX,
        signature=signature(model),
        expected_sha256=digest,
        expected_size_bytes=size,
        version=version,
        training_statistics=statistics,
        reason="monitored version",
    )
    m.stub.UploadModelVersion(upload_requests(metadata, model.path), timeout=30, metadata=m.metadata)


def label_predictions(world: World, m: Manager, model: str, model_file: ExportedModel, n: int = 150) -> None:
    """`n` held-out rows through the gateway (outside any experiment: v1 answers), each with a request id; once the
    manager holds their prediction records, their true labels through LogLabels."""
    data = demo_dataset()
    rows, truth = data.holdout_features[:n], data.holdout_labels[:n]
    options = channel_options(DEFAULT_MAX_MESSAGE_BYTES)
    ids = []
    with world.auth.admin.channel(world.suite.service("gateway").address, options) as channel:
        gateway = gpb_grpc.GatewayServiceStub(channel)
        for i, row in enumerate(rows):
            features = {name: float(v) for name, v in zip(model_file.feature_names, row, strict=True)}
            request = predict_request(model, features, request_id=f"labelled-{i}")
            answer = gateway.Predict(request, timeout=30, metadata=world.auth.admin.metadata())
            ids.append(answer.request_id)
    quality = mpb.GetPredictionQualityRequest(model_name=model, versions=[1])
    wait_for(
        lambda: m.stub.GetPredictionQuality(quality, timeout=30, metadata=m.metadata),
        lambda answer: bool(answer.versions) and max(w.predictions for w in answer.versions[0].windows) >= n,
        60,
        "the prediction records in the manager",
    )
    labels = [monpb.Label(request_id=r, value=float(v)) for r, v in zip(ids, truth, strict=True)]
    (acknowledged,) = m.stub.LogLabels(
        iter([mpb.LogLabelsRequest(labels=labels, batch_id="dashboards")]), timeout=30, metadata=m.metadata
    )
    assert (acknowledged.accepted, list(acknowledged.rejected)) == (n, [])
