"""Fuzzed GetFeatures and PushFeatures requests against the running service: every answer is OK,
INVALID_ARGUMENT or NOT_FOUND with a message, never INTERNAL, and the service stays healthy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fresco.api.common.v1 import values_pb2 as vpb
from fresco.api.features.v1 import feature_service_pb2 as pb
from fresco.api.features.v1 import feature_service_pb2_grpc as pb_grpc
from fresco.suite import ServiceProcess
from tests.rpc import outcome

pytestmark = pytest.mark.integration

DEFINITIONS = """
entities:
  - {name: user, join_keys: [{name: user_id, type: int64}]}
  - {name: shop, join_keys: [{name: shop_id, type: string}, {name: zone, type: int32}]}
feature_views:
  - name: users
    entities: [user]
    ttl_seconds: 60
    features:
      - {name: age, type: int64, range: {min: 0, max: 150}, null_policy: {strategy: median}}
      - {name: plan, type: string, categories: [a, b], null_policy: {strategy: most_frequent}}
      - {name: vec, type: float_list}
      - {name: raw, type: bytes}
      - {name: ok, type: bool, null_policy: {strategy: reject}}
  - name: shops
    entities: [shop]
    features:
      - {name: rating, type: double, null_policy: {strategy: mean}}
      - {name: ids, type: int32_list}
"""
OK_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
NAMES = st.sampled_from(
    ["user_id", "shop_id", "zone", "age", "plan", "vec", "raw", "ok", "rating", "ids", "", "x:y", "é"]
)

values = st.one_of(
    st.just(vpb.Value()),
    st.floats().map(lambda x: vpb.Value(double_value=x)),
    st.integers(-(2**63), 2**63 - 1).map(lambda x: vpb.Value(int64_value=x)),
    st.text(max_size=20).map(lambda x: vpb.Value(string_value=x)),
    st.booleans().map(lambda x: vpb.Value(bool_value=x)),
    st.binary(max_size=20).map(lambda x: vpb.Value(bytes_value=x)),
    st.lists(st.floats(), max_size=4).map(lambda x: vpb.Value(double_list=vpb.DoubleList(values=x))),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4).map(lambda x: vpb.Value(int64_list=vpb.Int64List(values=x))),
    st.lists(st.text(max_size=5), max_size=4).map(lambda x: vpb.Value(string_list=vpb.StringList(values=x))),
)
entity_keys = st.dictionaries(NAMES, values, max_size=4).map(lambda keys: vpb.EntityKey(join_keys=keys))
refs = st.one_of(
    st.sampled_from(["users:age", "users:plan", "users:vec", "users:raw", "users:ok", "shops:rating", "shops:ids"]),
    st.sampled_from(["users", "users:", ":age", "nope:age", "users:nope", "users:age:x", "", "::"]),
    st.text(max_size=12),
)
timestamps = st.builds(Timestamp, seconds=st.integers(-(2**40), 2**40), nanos=st.integers(-(2**31), 2**31 - 1))
durations = st.builds(Duration, seconds=st.integers(-(2**40), 2**40), nanos=st.integers(-(10**9) + 1, 10**9 - 1))


@st.composite
def get_requests(draw) -> pb.GetFeaturesRequest:
    request = pb.GetFeaturesRequest(
        entity_keys=draw(st.lists(entity_keys, max_size=5)),
        feature_refs=draw(st.lists(refs, max_size=5)),
        include_event_timestamps=draw(st.booleans()),
        disable_imputation=draw(st.booleans()),
    )
    if draw(st.booleans()):
        request.max_staleness.CopyFrom(draw(durations))
    return request


@st.composite
def push_messages(draw) -> list[pb.PushFeaturesRequest]:
    messages = []
    for _ in range(draw(st.integers(0, 3))):
        rows = []
        for _ in range(draw(st.integers(0, 4))):
            row = pb.FeatureRow(entity_key=draw(entity_keys), features=draw(st.dictionaries(NAMES, values, max_size=5)))
            if draw(st.booleans()):
                row.event_timestamp.CopyFrom(draw(timestamps))
            rows.append(row)
        view = draw(st.sampled_from(["users", "shops", "nope", ""]))
        messages.append(pb.PushFeaturesRequest(feature_view=view, rows=rows))
    return messages


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    root: Path = tmp_path_factory.mktemp("fuzz")
    (root / "features.yaml").write_text(DEFINITIONS)
    args = ["--definitions", str(root / "features.yaml"), "--sqlite-path", str(root / "f.db"), "--port", "0"]
    service = ServiceProcess("feature_service", args).start()
    try:
        service.wait_healthy(60)
        yield service
    finally:
        assert service.stop() == 0


@pytest.fixture(scope="module")
def channel(service: ServiceProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(service.address) as channel:
        yield channel


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=get_requests())
def test_get_features_never_fails_internally(channel, request) -> None:
    stub = pb_grpc.FeatureServiceStub(channel)
    assert outcome(lambda: stub.GetFeatures(request, timeout=30)) in OK_CODES


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=push_messages())
def test_push_features_never_fails_internally(channel, messages) -> None:
    stub = pb_grpc.FeatureServiceStub(channel)
    code = outcome(lambda: stub.PushFeatures(iter(messages), timeout=30))
    assert code == grpc.StatusCode.OK  # bad rows are rejected in the answer, not by failing the call


def test_still_healthy_and_serving_after_the_fuzz(channel) -> None:
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    stub = pb_grpc.FeatureServiceStub(channel)
    row = pb.FeatureRow(
        entity_key=vpb.EntityKey(join_keys={"user_id": vpb.Value(int64_value=1)}),
        features={"age": vpb.Value(int64_value=30), "ok": vpb.Value(bool_value=True)},
    )
    assert (
        stub.PushFeatures(iter([pb.PushFeaturesRequest(feature_view="users", rows=[row])]), timeout=10).accepted_count
        == 1
    )
    key = vpb.EntityKey(join_keys={"user_id": vpb.Value(int64_value=1)})
    answer = stub.GetFeatures(pb.GetFeaturesRequest(entity_keys=[key], feature_refs=["users:age"]), timeout=10)
    assert answer.columns[0].values[0].int64_value == 30
