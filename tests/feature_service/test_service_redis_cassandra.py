"""The feature service configured with Redis and Cassandra, end to end as a process: materialise, push,
read through the tiers, a CLI materialisation in process reaching the running service through the
invalidation bus, and the data still there after a restart."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest
from typer.testing import CliRunner

from fresco.api.common.v1 import values_pb2 as vpb
from fresco.api.features.v1 import feature_service_pb2 as pb
from fresco.api.features.v1 import feature_service_pb2_grpc as pb_grpc
from fresco.cli_features import app as features_cli
from fresco.servers import CassandraNode, RedisClusterServers, RedisServer
from fresco.suite import ServiceProcess

pytestmark = pytest.mark.integration

DEFINITIONS = """
entities: [{name: user, join_keys: [{name: user_id, type: int64}]}]
feature_views:
  - name: profile
    entities: [user]
    features:
      - {name: age, type: int64, null_policy: {strategy: mean}}
      - {name: plan, type: string}
"""


def users(*ids: int) -> list[vpb.EntityKey]:
    return [vpb.EntityKey(join_keys={"user_id": vpb.Value(int64_value=i)}) for i in ids]


def write_profiles(path: Path, ids: list[int], ages: list[int]) -> Path:
    table = {"user_id": ids, "age": ages, "plan": ["pro"] * len(ids), "event_timestamp": [time.time() - 5] * len(ids)}
    pq.write_table(pa.table(table), path)
    return path


@pytest.fixture(params=["redis", "redis-cluster"])
def backend(request: pytest.FixtureRequest, cassandra_server: CassandraNode, tmp_path: Path) -> dict[str, str]:
    """Settings, as FRESCO_FEATURE_SERVICE_* variables, of a keyspace and definitions of this test's own; the
    cache on one Redis, or on a Redis Cluster (--redis-cluster)."""
    cluster = request.param == "redis-cluster"
    redis: RedisServer | RedisClusterServers = request.getfixturevalue("redis_cluster" if cluster else "redis_server")
    (tmp_path / "features.yaml").write_text(DEFINITIONS)
    return {
        "FRESCO_FEATURE_SERVICE_REDIS_CLUSTER": "true" if cluster else "false",
        "FRESCO_FEATURE_SERVICE_DEFINITIONS": str(tmp_path / "features.yaml"),
        "FRESCO_FEATURE_SERVICE_BACKEND": "redis+cassandra",
        "FRESCO_FEATURE_SERVICE_REDIS_URL": redis.url,
        "FRESCO_FEATURE_SERVICE_CASSANDRA_CONTACT_POINTS": f'["{cassandra_server.contact_point}"]',
        "FRESCO_FEATURE_SERVICE_CASSANDRA_PORT": str(cassandra_server.port),
        "FRESCO_FEATURE_SERVICE_CASSANDRA_KEYSPACE": f"fs_{uuid.uuid4().hex[:10]}",
        "FRESCO_FEATURE_SERVICE_MATERIALIZE_SOURCE_DIRS": json.dumps([str(tmp_path)]),
    }


def start(env: dict[str, str]) -> ServiceProcess:
    service = ServiceProcess("feature_service", ["--port", "0"], env=env).start()
    service.wait_healthy(120)
    return service


@pytest.fixture
def service(backend: dict[str, str]) -> Iterator[ServiceProcess]:
    service = start(backend)
    try:
        yield service
    finally:
        assert service.stop() == 0


def read(stub, ids, refs=("profile:age",)) -> pb.GetFeaturesResponse:
    answer: pb.GetFeaturesResponse = stub.GetFeatures(
        pb.GetFeaturesRequest(entity_keys=users(*ids), feature_refs=list(refs)), timeout=30
    )
    return answer


def test_redis_and_cassandra_end_to_end(service, backend, tmp_path: Path, monkeypatch) -> None:
    with grpc.insecure_channel(service.address) as channel:
        stub = pb_grpc.FeatureServiceStub(channel)
        source = write_profiles(tmp_path / "p.parquet", [1, 2, 3], [20, 30, 40])
        materialized = stub.Materialize(
            pb.MaterializeRequest(feature_view="profile", source_uri=str(source)), timeout=60
        )
        assert materialized.rows_written == 3
        row = pb.FeatureRow(entity_key=users(4)[0], features={"plan": vpb.Value(string_value="free")})
        assert (
            stub.PushFeatures(
                iter([pb.PushFeaturesRequest(feature_view="profile", rows=[row])]), timeout=30
            ).accepted_count
            == 1
        )

        first = read(stub, [1, 4, 99])
        assert [v.int64_value for v in first.columns[0].values] == [20, 30, 30]  # 4 has a null age, 99 is unknown: mean
        assert list(first.columns[0].statuses) == [pb.FEATURE_STATUS_PRESENT] + [pb.FEATURE_STATUS_IMPUTED] * 2
        assert not first.metadata.degraded
        again = read(stub, [1, 2, 3])
        assert "memory" in again.metadata.served_tiers  # materialisation filled the memory tier

        # In process, as `fresco features materialize` without --service: the running service hears of the
        # writes on the invalidation bus at once, and of the new statistics within its poll.
        for name, value in backend.items():
            monkeypatch.setenv(name, value)
        updated = write_profiles(tmp_path / "q.parquet", [1, 5], [70, 50])
        result = CliRunner().invoke(features_cli, ["materialize", "--view", "profile", "--source", str(updated)])
        assert result.exit_code == 0, result.output
        deadline = time.monotonic() + 15
        while [v.int64_value for v in read(stub, [1, 5]).columns[0].values] != [70, 50] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [v.int64_value for v in read(stub, [1, 5]).columns[0].values] == [70, 50]
        while read(stub, [99]).columns[0].values[0].int64_value != 60 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert read(stub, [99]).columns[0].values[0].int64_value == 60  # the new statistics' mean

    assert service.stop() == 0
    restarted = start(backend)
    try:
        with grpc.insecure_channel(restarted.address) as channel:
            answer = read(pb_grpc.FeatureServiceStub(channel), [1, 2, 4], ["profile:age", "profile:plan"])
    finally:
        assert restarted.stop() == 0
    assert [v.int64_value for v in answer.columns[0].values] == [70, 30, 60]
    assert [v.string_value for v in answer.columns[1].values] == ["pro", "pro", "free"]
    assert set(answer.metadata.served_tiers) <= {"redis", "cassandra"}  # a new process: nothing in memory yet
