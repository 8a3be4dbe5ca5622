"""Parity in GetModelMonitor: filled from a real feature service's GetFeatureParity (its served values sampled and
checked against the materialised file), and the monitor answering without it, saying why, when the feature service
cannot be reached."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest

from fresco.api.common.v1 import values_pb2 as vpb
from fresco.api.features.v1 import feature_service_pb2 as fpb
from fresco.api.features.v1 import feature_service_pb2_grpc as fpb_grpc
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.suite import ServiceProcess
from tests.model_manager.monitor_support import REFS, message, register, sketches_of, traffic
from tests.model_manager.rollout_support import LocalFleet, LocalHub, manager

pytestmark = pytest.mark.integration

DEFINITIONS = """
entities: [{name: user, join_keys: [{name: user_id, type: int64}]}]
feature_views:
  - name: users
    entities: [user]
    ttl_seconds: 86400
    features:
      - {name: age, type: double, null_policy: {strategy: mean}}
      - {name: spend, type: double, null_policy: {strategy: mean}}
      - {name: visits, type: double, null_policy: {strategy: mean}}
"""
ENTITIES = 40


@pytest.fixture(scope="module")
def feature_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A feature service with the users view materialised from a file, every served entity sampled for parity, and
    every entity served once (so each feature has parity checks)."""
    root = tmp_path_factory.mktemp("parity")
    (root / "features.yaml").write_text(DEFINITIONS)
    rng = np.random.default_rng(4)
    table = {
        "user_id": list(range(ENTITIES)),
        **{name: rng.normal(size=ENTITIES).tolist() for name in ("age", "spend", "visits")},
        "event_timestamp": [time.time() - 60.0] * ENTITIES,
    }
    pq.write_table(pa.table(table), root / "users.parquet")
    args = ["--definitions", str(root / "features.yaml"), "--sqlite-path", str(root / "f.db"), "--port", "0",
            "--materialize-source-dirs", str(root), "--parity-sample-rate", "1"]  # fmt: skip
    service = ServiceProcess("feature_service", args).start()
    try:
        service.wait_healthy(60)
        with grpc.insecure_channel(service.address) as channel:
            stub = fpb_grpc.FeatureServiceStub(channel)
            done = stub.Materialize(
                fpb.MaterializeRequest(feature_view="users", source_uri=str(root / "users.parquet"))
            )
            assert done.rows_rejected == 0
            keys = [vpb.EntityKey(join_keys={"user_id": vpb.Value(int64_value=i)}) for i in range(ENTITIES)]
            stub.GetFeatures(fpb.GetFeaturesRequest(entity_keys=keys, feature_refs=list(REFS)), timeout=30)
            deadline = time.monotonic() + 60
            while True:
                counts = stub.GetFeatureParity(fpb.GetFeatureParityRequest(), timeout=10).features
                if len(counts) == len(REFS) and all(c.checked == ENTITIES for c in counts):
                    break
                assert time.monotonic() < deadline, counts
                time.sleep(0.05)
        yield service
    finally:
        assert service.stop() == 0


async def test_the_monitor_shows_each_features_parity(feature_service: ServiceProcess, tmp_path: Path) -> None:
    async with manager(
        tmp_path, LocalFleet(), LocalHub(), drift_refresh_s=300, feature_service_address=feature_service.address
    ) as (mm, stub):
        assert mm.registry is not None
        model = register(mm.registry)
        window = message(model, 1, sketches_of(traffic(3, 1200)), end=time.time() - 1)
        assert (await stub.ReportMetrics(pb.ReportMetricsRequest(gateway_id="gw", windows=[window]))).accepted_windows
        answer = await stub.GetModelMonitor(pb.GetModelMonitorRequest(model_name=model))
        assert list(answer.notes) == []
        parity = {
            f.name: (f.parity.feature_ref, f.parity.checked, f.parity.mismatched) for f in answer.versions[0].features
        }
        assert parity == {ref: (ref, ENTITIES, 0) for ref in REFS}


async def test_the_monitor_answers_without_parity_when_the_feature_service_is_down(tmp_path: Path) -> None:
    async with manager(
        tmp_path, LocalFleet(), LocalHub(), drift_refresh_s=300, feature_service_address="127.0.0.1:9",
        feature_service_timeout_s=2.0,
    ) as (mm, stub):  # fmt: skip
        assert mm.registry is not None
        model = register(mm.registry)
        window = message(model, 1, sketches_of(traffic(3, 1200)), end=time.time() - 1)
        assert (await stub.ReportMetrics(pb.ReportMetricsRequest(gateway_id="gw", windows=[window]))).accepted_windows
        answer = await stub.GetModelMonitor(pb.GetModelMonitorRequest(model_name=model))
        (note,) = answer.notes
        assert note.startswith("parity: feature service 127.0.0.1:9 answered UNAVAILABLE")
        assert note.endswith("shown without parity")
        assert [f.windows[0].count for f in answer.versions[0].features] == [1200, 1200, 1200]
        assert not any(f.HasField("parity") for f in answer.versions[0].features)
