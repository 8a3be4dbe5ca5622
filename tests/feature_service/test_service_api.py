"""The feature service as a process: catalog RPCs, Materialize, metrics, start-up checks, and
`fresco features materialize` through the service or in process beside it."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from fresco.api.common.v1 import values_pb2 as vpb
from fresco.api.features.v1 import feature_service_pb2 as pb
from fresco.api.features.v1 import feature_service_pb2_grpc as pb_grpc
from fresco.api.features.v1 import feature_view_pb2 as fvpb
from fresco.cli_features import app as features_cli
from fresco.suite import ServiceProcess

pytestmark = pytest.mark.integration

DEFINITIONS = """
entities:
  - {name: user, join_keys: [{name: user_id, type: int64}]}
feature_views:
  - name: profile
    entities: [user]
    ttl_seconds: 86400
    labels: {team: growth}
    features:
      - {name: age, type: int64, range: {min: 0, max: 130}, null_policy: {strategy: median}}
      - {name: plan, type: string, categories: [free, pro], null_policy: {strategy: default_value, default: free}}
  - name: activity
    entities: [user]
    labels: {team: growth}
    features:
      - {name: clicks, type: int64}
  - name: risk
    entities: [user]
    labels: {team: risk}
    features:
      - {name: score, type: double, null_policy: {strategy: reject}}
"""


def users(*ids: int) -> list[vpb.EntityKey]:
    return [vpb.EntityKey(join_keys={"user_id": vpb.Value(int64_value=i)}) for i in ids]


def profiles(path: Path, ids: range, age_offset: int = 0) -> Path:
    now = time.time()
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array(list(ids), pa.int64()),
                "age": pa.array([20 + (i % 50) + age_offset for i in ids], pa.int64()),
                "plan": ["pro" if i % 3 else "free" for i in ids],
                "event_timestamp": [now - 10] * len(ids),
            }
        ),
        path,
    )
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("service")
    (root / "features.yaml").write_text(DEFINITIONS)
    return root


@pytest.fixture(scope="module")
def service(workdir: Path) -> Iterator[ServiceProcess]:
    args = ["--definitions", str(workdir / "features.yaml"), "--sqlite-path", str(workdir / "f.db"), "--port", "0"]
    args += ["--materialize-source-dirs", str(workdir)]
    service = ServiceProcess("feature_service", [*args, "--statistics-poll-s", "0.2"]).start()
    try:
        service.wait_healthy(60)
        yield service
    finally:
        assert service.stop() == 0


@pytest.fixture(scope="module")
def stub(service: ServiceProcess) -> Iterator[pb_grpc.FeatureServiceStub]:
    with grpc.insecure_channel(service.address) as channel:
        yield pb_grpc.FeatureServiceStub(channel)


def error(call, *args) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, timeout=30)
    return caught.value.code(), caught.value.details() or ""


def test_list_pages_and_filters_by_label(stub) -> None:
    first = stub.ListFeatureViews(pb.ListFeatureViewsRequest(page_size=2), timeout=10)
    assert [v.name for v in first.feature_views] == ["activity", "profile"]
    rest = stub.ListFeatureViews(pb.ListFeatureViewsRequest(page_size=2, page_token=first.next_page_token), timeout=10)
    assert ([v.name for v in rest.feature_views], rest.next_page_token) == (["risk"], "")
    growth = stub.ListFeatureViews(pb.ListFeatureViewsRequest(label_selector={"team": "growth"}), timeout=10)
    assert [v.name for v in growth.feature_views] == ["activity", "profile"]
    assert (
        error(stub.ListFeatureViews, pb.ListFeatureViewsRequest(page_token="x"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert error(stub.ListFeatureViews, pb.ListFeatureViewsRequest(page_size=-1))[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_get_feature_view_describes_the_definition(stub) -> None:
    view = stub.GetFeatureView(pb.GetFeatureViewRequest(name="profile"), timeout=10).feature_view
    assert (view.name, view.ttl.seconds, dict(view.labels)) == ("profile", 86400, {"team": "growth"})
    assert [(k.name, k.value_type) for e in view.entities for k in e.join_keys] == [("user_id", fvpb.VALUE_TYPE_INT64)]
    age, plan = view.features
    assert (age.value_type, age.null_policy.strategy) == (fvpb.VALUE_TYPE_INT64, fvpb.IMPUTATION_STRATEGY_MEDIAN)
    assert (age.constraint.range.min, age.constraint.range.max) == (0, 130)
    assert list(plan.constraint.categories.values) == ["free", "pro"]
    assert plan.null_policy.default_value.string_value == "free"
    assert view.updated_at.seconds > 0
    code, details = error(stub.GetFeatureView, pb.GetFeatureViewRequest(name="nope"))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "nope" in details


def test_materialize_then_statistics_and_imputation(stub, workdir: Path) -> None:
    code, _ = error(stub.GetFeatureViewStatistics, pb.GetFeatureViewStatisticsRequest(feature_view="risk"))
    assert code == grpc.StatusCode.NOT_FOUND
    source = profiles(workdir / "profiles.parquet", range(100))
    response = stub.Materialize(pb.MaterializeRequest(feature_view="profile", source_uri=source.as_uri()), timeout=60)
    assert (response.rows_read, response.rows_written, response.rows_rejected) == (100, 100, 0)
    assert response.statistics.features[0].feature_name == "age"
    stats = stub.GetFeatureViewStatistics(
        pb.GetFeatureViewStatisticsRequest(feature_view="profile", feature_names=["plan"]), timeout=10
    ).statistics
    assert [f.feature_name for f in stats.features] == ["plan"]
    assert stats.features[0].categorical.distinct_count == 2
    view = stub.GetFeatureView(pb.GetFeatureViewRequest(name="profile"), timeout=10).feature_view
    assert view.latest_statistics.row_count == 100
    median = next(p.value for p in view.latest_statistics.features[0].numeric.percentiles if p.quantile == 0.5)
    answer = stub.GetFeatures(
        pb.GetFeaturesRequest(entity_keys=users(5, 1000), feature_refs=["profile:age"]), timeout=10
    )
    assert [v.int64_value for v in answer.columns[0].values] == [25, round(median)]
    assert list(answer.columns[0].statuses) == [pb.FEATURE_STATUS_PRESENT, pb.FEATURE_STATUS_IMPUTED]
    code, details = error(
        stub.GetFeatureViewStatistics, pb.GetFeatureViewStatisticsRequest(feature_view="profile", feature_names=["x"])
    )
    assert code == grpc.StatusCode.NOT_FOUND
    assert "x" in details


@pytest.mark.parametrize(
    ("request_", "code", "word"),
    [
        (pb.MaterializeRequest(feature_view="nope", source_uri="/x.parquet"), grpc.StatusCode.NOT_FOUND, "nope"),
        (
            pb.MaterializeRequest(feature_view="profile", source_uri="/no/such.parquet"),
            grpc.StatusCode.PERMISSION_DENIED,
            "materialize_source_dirs",
        ),
        (
            pb.MaterializeRequest(feature_view="profile", source_uri="http://x/y.csv"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "scheme",
        ),
        (
            pb.MaterializeRequest(
                feature_view="profile",
                source_uri="/x.parquet",
                start_time=Timestamp(seconds=10),
                end_time=Timestamp(seconds=5),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "end_time",
        ),
        (
            pb.MaterializeRequest(feature_view="profile", source_uri="/x.parquet", format=9),
            grpc.StatusCode.INVALID_ARGUMENT,
            "format",
        ),
    ],
)
def test_bad_materialize_requests(stub, request_, code, word) -> None:
    got, details = error(stub.Materialize, request_)
    assert got == code
    assert word in details


def test_metrics_count_served_values(stub, service: ServiceProcess) -> None:
    stub.GetFeatures(
        pb.GetFeaturesRequest(entity_keys=users(1, 2, 99_999), feature_refs=["activity:clicks"]), timeout=10
    )
    text = urllib.request.urlopen(service.metrics_url, timeout=10).read().decode()
    assert 'fresco_feature_values_served_total{feature="clicks",status="not_found",view="activity"} 3.0' in text
    assert "fresco_feature_tier_latency_seconds_bucket" in text
    assert 'fresco_rpc_requests_total{code="OK",method="/fresco.features.v1.FeatureService/GetFeatures"' in text


def test_cli_materializes_through_the_service(service: ServiceProcess, workdir: Path, stub) -> None:
    source = profiles(workdir / "via-rpc.parquet", range(200, 230))
    result = CliRunner().invoke(
        features_cli, ["materialize", "--view", "profile", "--source", str(source), "--service", service.address]
    )
    assert result.exit_code == 0, result.output
    assert "read 30 rows" in result.output
    assert "wrote 30 entities" in result.output
    assert "statistics of profile" in result.output
    answer = stub.GetFeatures(pb.GetFeaturesRequest(entity_keys=users(211), feature_refs=["profile:plan"]), timeout=10)
    assert answer.columns[0].values[0].string_value == "pro"


def test_cli_in_process_beside_the_running_service(service: ServiceProcess, workdir: Path, stub) -> None:
    """The service notices the new statistics, reloads its baselines and rebuilds the view's bloom filter."""
    entity = users(5000)
    before = stub.GetFeatures(pb.GetFeaturesRequest(entity_keys=entity, feature_refs=["profile:plan"]), timeout=10)
    assert list(before.columns[0].statuses) == [pb.FEATURE_STATUS_IMPUTED]  # never written: the default
    source = profiles(workdir / "in-process.parquet", range(5000, 5010), age_offset=60)
    result = CliRunner().invoke(
        features_cli,
        ["materialize", "--view", "profile", "--source", str(source),
         "--definitions", str(workdir / "features.yaml"), "--sqlite-path", str(workdir / "f.db")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "wrote 10 entities" in result.output
    deadline = time.monotonic() + 10
    while True:
        stats = stub.GetFeatureViewStatistics(pb.GetFeatureViewStatisticsRequest(feature_view="profile"), timeout=10)
        if stats.statistics.row_count == 10 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert stats.statistics.row_count == 10
    after = stub.GetFeatures(pb.GetFeaturesRequest(entity_keys=entity, feature_refs=["profile:age"]), timeout=10)
    assert (after.columns[0].values[0].int64_value, after.columns[0].statuses[0]) == (80, pb.FEATURE_STATUS_PRESENT)


def test_cli_reports_bad_input_without_a_traceback(workdir: Path) -> None:
    result = CliRunner().invoke(
        features_cli,
        ["materialize", "--view", "nope", "--source", "x.parquet", "--definitions", str(workdir / "features.yaml"),
         "--sqlite-path", str(workdir / "other.db")],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "unknown feature view 'nope'" in result.output
    bad = CliRunner().invoke(features_cli, ["materialize", "--view", "v", "--source", "s", "--feature-column", "x"])
    assert bad.exit_code == 2


def test_health_and_a_bad_definitions_file(service: ServiceProcess, tmp_path: Path) -> None:
    with grpc.insecure_channel(service.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="fresco.features.v1.FeatureService"), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    (tmp_path / "bad.yaml").write_text("feature_views: [{name: v, entities: [ghost], features: []}]\nentities: []\n")
    done = subprocess.run(
        [sys.executable, "-m", "feature_service", "--definitions", str(tmp_path / "bad.yaml"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "bad.yaml" in done.stderr
    assert "ghost" in done.stderr


def test_not_serving_until_the_durable_tier_is_reachable(tmp_path: Path) -> None:
    """A database directory that cannot be created yet: NOT_SERVING and UNAVAILABLE, then SERVING once it can."""
    (tmp_path / "features.yaml").write_text(DEFINITIONS)
    (tmp_path / "blocker").write_text("a file where the database directory should be")
    args = ["--definitions", str(tmp_path / "features.yaml"), "--sqlite-path", str(tmp_path / "blocker" / "f.db")]
    service = ServiceProcess("feature_service", [*args, "--port", "0", "--connect-retry-s", "0.2"]).start()
    try:
        with grpc.insecure_channel(service.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            time.sleep(1.0)
            assert (
                health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                == health_pb2.HealthCheckResponse.NOT_SERVING
            )
            code, details = error(pb_grpc.FeatureServiceStub(channel).ListFeatureViews, pb.ListFeatureViewsRequest())
            assert code == grpc.StatusCode.UNAVAILABLE
            assert "starting" in details
            (tmp_path / "blocker").unlink()
            service.wait_healthy(30)
        assert "durable tier not reachable" in service.output()
    finally:
        assert service.stop() == 0


def at(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def test_push_reports_features_left_out_and_the_last_event_wins(stub) -> None:
    now = time.time()
    key = users(9001)[0]

    def push(event: float, **features: vpb.Value) -> pb.PushFeaturesResponse:
        message = pb.PushFeaturesRequest(
            feature_view="profile",
            rows=[pb.FeatureRow(entity_key=key, features=features, event_timestamp=at(event))],
        )
        response: pb.PushFeaturesResponse = stub.PushFeatures(iter([message]), timeout=30)
        return response

    def served() -> tuple[list[int], list[int]]:
        answer = stub.GetFeatures(
            pb.GetFeaturesRequest(entity_keys=[key], feature_refs=["profile:age", "profile:plan"]), timeout=10
        )
        return [answer.columns[0].values[0].int64_value], list(answer.columns[1].statuses)

    full = push(now - 60, age=vpb.Value(int64_value=30), plan=vpb.Value(string_value="pro"))
    assert (full.accepted_count, list(full.omitted_features)) == (1, [])
    # A row is a snapshot: plan, left out, is stored as null, and the answer says so.
    partial = push(now - 30, age=vpb.Value(int64_value=31))
    assert [(o.feature_view, o.feature, o.row_count) for o in partial.omitted_features] == [("profile", "plan", 1)]
    assert served() == ([31], [pb.FEATURE_STATUS_IMPUTED])  # null, filled by the view's default_value policy
    # A late event (a replay, a backfill) is accepted but never replaces a later one.
    late = push(now - 3600, age=vpb.Value(int64_value=99), plan=vpb.Value(string_value="free"))
    assert late.accepted_count == 1
    assert served() == ([31], [pb.FEATURE_STATUS_IMPUTED])


def test_settings_bound_get_features_and_materialize(tmp_path: Path) -> None:
    """The values limit of GetFeatures is a setting named in its error; without source directories Materialize
    refuses every file, naming the setting."""
    (tmp_path / "features.yaml").write_text(DEFINITIONS)
    source = profiles(tmp_path / "profiles.parquet", range(3))
    args = ["--definitions", str(tmp_path / "features.yaml"), "--sqlite-path", str(tmp_path / "f.db")]
    service = ServiceProcess("feature_service", [*args, "--port", "0", "--max-values-per-get", "3"]).start()
    try:
        service.wait_healthy(60)
        with grpc.insecure_channel(service.address) as channel:
            stub = pb_grpc.FeatureServiceStub(channel)
            request = pb.GetFeaturesRequest(entity_keys=users(1, 2), feature_refs=["profile:age", "profile:plan"])
            code, details = error(stub.GetFeatures, request)
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "at most 3" in details
            assert "max_values_per_get" in details
            small = pb.GetFeaturesRequest(entity_keys=users(1), feature_refs=["profile:age", "profile:plan"])
            assert len(stub.GetFeatures(small, timeout=10).columns) == 2
            code, details = error(
                stub.Materialize, pb.MaterializeRequest(feature_view="profile", source_uri=str(source))
            )
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            assert "--materialize-source-dirs" in details
    finally:
        assert service.stop() == 0
