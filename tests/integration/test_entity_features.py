"""The gateway's Predict by entity keys: the model's features are fetched from the feature service
in one call (a real feature_service process on its embedded SQLite store) and the answer matches
ONNX Runtime on exactly the values pushed for that entity."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from fresco.api.common.v1 import values_pb2
from fresco.api.features.v1 import feature_service_pb2 as fpb
from fresco.api.features.v1 import feature_service_pb2_grpc as fpb_grpc
from fresco.api.gateway.v1 import gateway_pb2 as gpb
from fresco.api.gateway.v1 import gateway_pb2_grpc as gpb_grpc
from fresco.suite import Suite, start_suite
from fresco.training import train_classifier
from tests.integration import Reference

pytestmark = pytest.mark.integration

REFS = [f"user_stats:s{i}" for i in range(8)]
FILLED = [f"user_filled:t{i}" for i in range(8)]
FILL = 0.25
DEFINITIONS = (
    """
entities:
  - name: user
    join_keys: [{name: user_id, type: int64}]
feature_views:
  - name: user_stats
    entities: [user]
    features:
"""
    + "".join(f"      - {{name: s{i}, type: double}}\n" for i in range(8))
    + """
  - name: user_filled
    entities: [user]
    features:
"""
    + "".join(
        f"      - {{name: t{i}, type: double, null_policy: {{strategy: default_value, default: {FILL}}}}}\n"
        for i in range(8)
    )
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Suite, Reference]]:
    root = tmp_path_factory.mktemp("entity-features")
    model = train_classifier(root / "models", name="by_user", feature_names=REFS)
    (root / "definitions.yaml").write_text(DEFINITIONS)
    suite = start_suite(root / "models", feature_definitions=root / "definitions.yaml", feature_db=root / "f.db")
    try:
        yield suite, Reference(model)
    finally:
        suite.stop()


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Suite, Reference]]:
    """A model on the view whose features impute 0.25 when missing, as its training did."""
    root = tmp_path_factory.mktemp("imputed-features")
    model = train_classifier(root / "models", name="filled", feature_names=FILLED, seed=5)
    (root / "definitions.yaml").write_text(DEFINITIONS)
    suite = start_suite(root / "models", feature_definitions=root / "definitions.yaml", feature_db=root / "f.db")
    try:
        yield suite, Reference(model)
    finally:
        suite.stop()


def _user(user_id: int) -> values_pb2.EntityKey:
    return values_pb2.EntityKey(join_keys={"user_id": values_pb2.Value(int64_value=user_id)})


def test_predict_by_entity_key_fetches_the_features(world: tuple[Suite, Reference]) -> None:
    suite, reference = world
    services = {service.module: service for service in suite.services}
    rows = np.random.default_rng(3).normal(size=(5, 8)).astype(np.float32)
    with grpc.insecure_channel(services["feature_service"].address) as channel:

        def pushes() -> Iterator[fpb.PushFeaturesRequest]:
            yield fpb.PushFeaturesRequest(
                feature_view="user_stats",
                rows=[
                    fpb.FeatureRow(
                        entity_key=_user(user_id),
                        features={f"s{i}": values_pb2.Value(double_value=float(v)) for i, v in enumerate(row)},
                    )
                    for user_id, row in enumerate(rows)
                ],
            )

        pushed = fpb_grpc.FeatureServiceStub(channel).PushFeatures(pushes(), timeout=10)
    assert (pushed.accepted_count, pushed.rejected_count) == (5, 0)

    with grpc.insecure_channel(services["gateway"].address) as channel:
        gateway = gpb_grpc.GatewayServiceStub(channel)
        batch = gateway.PredictBatch(
            gpb.PredictBatchRequest(
                requests=[gpb.PredictRequest(model="by_user", entity_keys=[_user(u)]) for u in (4, 0, 2, 4)]
            ),
            timeout=10,
        )
        expected = reference.predict(rows[[4, 0, 2, 4]])
        got = np.array([list(r.outputs["probabilities"].double_values) for r in batch.responses])
        np.testing.assert_allclose(got, expected["probabilities"], rtol=1e-5, atol=1e-6)

        # A caller's own value for a feature wins over the stored one.
        override = gpb.PredictRequest(model="by_user", entity_keys=[_user(1)])
        override.features["user_stats:s0"].double_value = 9.0
        answer = gateway.Predict(override, timeout=10)
        mixed = rows[1].copy()
        mixed[0] = 9.0
        np.testing.assert_allclose(
            list(answer.outputs["probabilities"].double_values),
            reference.predict(mixed[None])["probabilities"][0],
            rtol=1e-5,
            atol=1e-6,
        )

        assert (list(answer.imputed_features), answer.degraded) == ([], False)

        # An entity never written has no values and the policy keeps nulls: the gateway names the
        # entity and the feature, and does not blame the caller's arguments.
        with pytest.raises(grpc.RpcError) as caught:
            gateway.Predict(gpb.PredictRequest(model="by_user", entity_keys=[_user(777)]), timeout=10)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = caught.value.details() or ""
        assert "entity user_id=777" in details
        assert "feature 'user_stats:s0'" in details
        assert "FEATURE_STATUS_NOT_FOUND" in details


def test_missing_features_are_imputed_by_their_policy_and_reported(filled: tuple[Suite, Reference]) -> None:
    suite, reference = filled
    services = {service.module: service for service in suite.services}
    row = np.random.default_rng(5).normal(size=8).astype(np.float32)
    with grpc.insecure_channel(services["feature_service"].address) as channel:
        # t4..t7 pushed as explicit nulls: stored null, served as the policy's 0.25.
        features = {f"t{i}": values_pb2.Value(double_value=float(v)) for i, v in enumerate(row[:4])}
        features.update({f"t{i}": values_pb2.Value() for i in range(4, 8)})
        push = fpb.PushFeaturesRequest(
            feature_view="user_filled", rows=[fpb.FeatureRow(entity_key=_user(1), features=features)]
        )
        pushed = fpb_grpc.FeatureServiceStub(channel).PushFeatures(iter([push]), timeout=10)
    assert (pushed.accepted_count, pushed.rejected_count) == (1, 0)

    with grpc.insecure_channel(services["gateway"].address) as channel:
        gateway = gpb_grpc.GatewayServiceStub(channel)
        partial = gateway.Predict(gpb.PredictRequest(model="filled", entity_keys=[_user(1)]), timeout=10)
        unknown = gateway.Predict(gpb.PredictRequest(model="filled", entity_keys=[_user(999)]), timeout=10)
    expected_row = np.concatenate([row[:4], np.full(4, FILL, dtype=np.float32)])
    np.testing.assert_allclose(
        list(partial.outputs["probabilities"].double_values),
        reference.predict(expected_row[None])["probabilities"][0],
        rtol=1e-5,
        atol=1e-6,
    )
    assert list(partial.imputed_features) == FILLED[4:]
    assert partial.degraded is True
    # Nothing stored at all: every feature imputed, as training imputed a missing row.
    np.testing.assert_allclose(
        list(unknown.outputs["probabilities"].double_values),
        reference.predict(np.full((1, 8), FILL, dtype=np.float32))["probabilities"][0],
        rtol=1e-5,
        atol=1e-6,
    )
    assert list(unknown.imputed_features) == FILLED
    assert unknown.degraded is True
