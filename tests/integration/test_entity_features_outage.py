"""The gateway in front of a real feature service on Redis + Cassandra whose durable tier goes down:
a value that only Cassandra could supply comes back UNAVAILABLE naming the view, never as the
caller's mistake and never as a prediction on made-up values; values still served from Redis keep
answering."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from fresco.api.common.v1 import values_pb2
from fresco.api.features.v1 import feature_service_pb2 as fpb
from fresco.api.features.v1 import feature_service_pb2_grpc as fpb_grpc
from fresco.api.gateway.v1 import gateway_pb2 as gpb
from fresco.api.gateway.v1 import gateway_pb2_grpc as gpb_grpc
from fresco.servers import CassandraNode, RedisServer
from fresco.servers.pytest_plugin import cassandra_server
from fresco.suite import ServiceProcess, Suite
from fresco.training import train_classifier
from tests.integration import Reference
from tests.integration.test_entity_features import DEFINITIONS, REFS, _user

__all__ = ["cassandra_server"]

pytestmark = pytest.mark.integration


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, so emptying it touches no other test."""
    with RedisServer(data_dir=tmp_path / "redis") as server:
        yield server


def test_durable_tier_down_is_unavailable_naming_the_view(
    tmp_path: Path, own_redis: RedisServer, cassandra_server: CassandraNode
) -> None:
    reference = Reference(train_classifier(tmp_path / "models", name="by_user", feature_names=REFS))
    (tmp_path / "definitions.yaml").write_text(DEFINITIONS)
    suite = Suite()
    try:
        features = suite.start(
            ServiceProcess(
                "feature_service",
                [
                    *("--definitions", str(tmp_path / "definitions.yaml"), "--port", "0", "--metrics-port", "-1"),
                    *("--backend", "redis+cassandra", "--redis-url", own_redis.url),
                    *("--cassandra-port", str(cassandra_server.port), "--cassandra-keyspace", "gateway_outage"),
                    *("--memory-max-entries", "0"),  # every read goes to Redis, then Cassandra
                ],
                log_path=tmp_path / "feature_service.log",
            )
        )
        predictor = suite.start(
            ServiceProcess(
                "predictor",
                ["--model-repository", str(tmp_path / "models"), "--port", "0", "--metrics-port", "-1"],
                log_path=tmp_path / "predictor.log",
            )
        )
        gateway = suite.start(
            ServiceProcess(
                "gateway",
                [
                    *("--predictor", predictor.address, "--feature-service", features.address),
                    *("--port", "0", "--metrics-port", "-1"),
                ],
                log_path=tmp_path / "gateway.log",
            )
        )
        rows = np.random.default_rng(5).normal(size=(2, 8))
        with grpc.insecure_channel(features.address) as channel:
            pushed = fpb_grpc.FeatureServiceStub(channel).PushFeatures(
                iter(
                    [
                        fpb.PushFeaturesRequest(
                            feature_view="user_stats",
                            rows=[
                                fpb.FeatureRow(
                                    entity_key=_user(user_id),
                                    features={
                                        f"s{i}": values_pb2.Value(double_value=float(v)) for i, v in enumerate(row)
                                    },
                                )
                                for user_id, row in enumerate(rows)
                            ],
                        )
                    ]
                ),
                timeout=30,
            )
        assert (pushed.accepted_count, pushed.rejected_count) == (2, 0)

        with grpc.insecure_channel(gateway.address) as channel:
            gateway_stub = gpb_grpc.GatewayServiceStub(channel)
            answer = gateway_stub.Predict(gpb.PredictRequest(model="by_user", entity_keys=[_user(1)]), timeout=10)
            np.testing.assert_allclose(
                list(answer.outputs["probabilities"].double_values),
                reference.predict(rows[1:2].astype(np.float32))["probabilities"][0],
                rtol=1e-5,
                atol=1e-6,
            )

            # User 0's values now live only in Cassandra; then Cassandra goes down.
            client = redis.Redis.from_url(own_redis.url)
            try:
                removed = [key for key in client.scan_iter() if b"user_stats" in key]
                assert removed, "the push left nothing in Redis to take away"
                client.delete(*removed)
            finally:
                client.close()
            cassandra_server.kill()
            try:
                with pytest.raises(grpc.RpcError) as caught:
                    gateway_stub.Predict(gpb.PredictRequest(model="by_user", entity_keys=[_user(0)]), timeout=30)
            finally:
                cassandra_server.start()  # the other tests of the session share this node
    finally:
        suite.stop()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    assert "user_stats" in (caught.value.details() or ""), caught.value.details()
