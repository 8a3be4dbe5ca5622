"""A reload that reorders a model's features, seen through a real gateway and predictor: the
gateway keeps its cached signature for an hour, yet every answer is the one ONNX Runtime gives for
the version that answered, fed in that version's feature order."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from fresco.api.gateway.v1 import gateway_pb2 as gpb
from fresco.api.gateway.v1 import gateway_pb2_grpc as gpb_grpc
from fresco.api.inference import grpc_service_pb2 as pb
from fresco.api.inference import grpc_service_pb2_grpc as pb_grpc
from fresco.suite import ServiceProcess, Suite
from fresco.training import train_classifier
from tests.integration import CLIENT_OPTIONS, Reference, assert_matches_reference, features_of

pytestmark = pytest.mark.integration

NAMES = [f"f{i}" for i in range(8)]


HOUR_CACHE = {"FRESCO_GATEWAY_METADATA_TTL_S": "3600", "FRESCO_GATEWAY_DEFAULT_VERSION_TTL_S": "3600"}


def start_pair(models: Path, *predictor_args: str, gateway_env: dict[str, str] | None = None) -> Suite:
    """A predictor on `models` and a gateway routed to it, both healthy (stop the suite after)."""
    suite = Suite()
    try:
        predictor = suite.start(
            ServiceProcess(
                "predictor",
                ["--model-repository", str(models), "--port", "0", "--metrics-port", "-1", *predictor_args],
            )
        )
        suite.start(
            ServiceProcess(
                "gateway",
                ["--predictor", predictor.address, "--port", "0", "--metrics-port", "-1"],
                env=gateway_env or {},
            )
        )
    except BaseException:
        suite.stop()
        raise
    return suite


def service(suite: Suite, module: str) -> ServiceProcess:
    return next(s for s in suite.services if s.module == module)


@dataclass
class World:
    """A predictor with model "pin" (version 1, features f0..f7) and a gateway caching for an hour."""

    models: Path
    suite: Suite
    first: Reference

    def service(self, module: str) -> ServiceProcess:
        return service(self.suite, module)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    models = tmp_path_factory.mktemp("pinning") / "models"
    first = Reference(train_classifier(models, "pin", 1, seed=7, feature_names=NAMES))
    suite = start_pair(models, "--model-control-mode", "explicit", "--load-model", "*", gateway_env=HOUR_CACHE)
    try:
        yield World(models, suite, first)
    finally:
        suite.stop()


def _predict(
    gateway: gpb_grpc.GatewayServiceStub, rows: np.ndarray, model: str = "pin"
) -> tuple[list[str], dict[str, np.ndarray]]:
    """One PredictBatch of `rows`: the versions that answered, and the outputs as arrays."""
    batch = gateway.PredictBatch(
        gpb.PredictBatchRequest(requests=[gpb.PredictRequest(model=model, features=features_of(r)) for r in rows]),
        timeout=10,
    )
    versions = [answer.model_version for answer in batch.responses]
    outputs = {
        "label": np.array([answer.outputs["label"].int64_values[0] for answer in batch.responses]),
        "probabilities": np.array([list(answer.outputs["probabilities"].double_values) for answer in batch.responses]),
    }
    return versions, outputs


def test_reload_with_reordered_features_is_fed_in_the_new_order(world: World) -> None:
    rows = world.first.model.sample[:16]
    with grpc.insecure_channel(world.service("gateway").address, options=CLIENT_OPTIONS) as channel:
        gateway = gpb_grpc.GatewayServiceStub(channel)
        versions, outputs = _predict(gateway, rows)
        assert versions == ["1"] * len(rows)
        assert_matches_reference(outputs, world.first.predict(rows))

        # Version 2 reads its features in the opposite order; the model's config says so, and the
        # reload retires version 1 (the policy serves the latest one).
        second = Reference(train_classifier(world.models, "pin", 2, seed=11, feature_names=NAMES[::-1]))
        with grpc.insecure_channel(world.service("predictor").address) as predictor_channel:
            pb_grpc.GRPCInferenceServiceStub(predictor_channel).RepositoryModelLoad(
                pb.RepositoryModelLoadRequest(model_name="pin"), timeout=60
            )

        versions, outputs = _predict(gateway, rows)
    assert versions == ["2"] * len(rows)
    expected = second.predict(rows[:, ::-1])  # column j of version 2's input is feature f(7 - j)
    assert_matches_reference(outputs, expected)
    wrong = second.predict(rows)
    assert not np.allclose(expected["probabilities"], wrong["probabilities"]), "the orders must give different answers"


def test_configured_default_version_is_the_one_pinned(tmp_path: Path) -> None:
    """Versions 1 and 2 served side by side, the config naming 1 the default: requests without a
    version go to version 1 by number (not to the highest one), fed and answered as version 1."""
    models = tmp_path / "models"
    first = Reference(train_classifier(models, "dual", 1, seed=7, feature_names=NAMES))
    train_classifier(models, "dual", 2, seed=11, feature_names=NAMES)
    config = models / "dual" / "config.yaml"
    config.write_text(config.read_text() + "version_policy: {all: true}\ndefault_version: 1\n")
    suite = start_pair(models)
    try:
        with grpc.insecure_channel(service(suite, "predictor").address) as channel:
            metadata = pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
                pb.ModelMetadataRequest(name="dual"), timeout=10
            )
        assert list(metadata.versions) == ["1", "2"]
        assert metadata.parameters["version"].string_param == "1"
        rows = first.model.sample[:8]
        with grpc.insecure_channel(service(suite, "gateway").address, options=CLIENT_OPTIONS) as channel:
            versions, outputs = _predict(gpb_grpc.GatewayServiceStub(channel), rows, "dual")
    finally:
        suite.stop()
    assert versions == ["1"] * len(rows)
    np.testing.assert_allclose(outputs["probabilities"], first.predict(rows)["probabilities"], rtol=1e-5, atol=1e-6)


def test_features_reordered_in_place_under_the_same_version_are_followed(tmp_path: Path) -> None:
    """Version 1 itself is replaced by one reading its features in the opposite order, and reloaded
    under the same number, while the gateway caches version 1's signature for an hour. The
    predictor refuses the tensor built in the old order (the gateway names the order it used), the
    gateway reads the metadata again and redoes the call: every answer is the new model's, fed in
    its order."""
    models = tmp_path / "models"
    first = Reference(train_classifier(models, "inplace", 1, seed=7, feature_names=NAMES))
    suite = start_pair(models, "--model-control-mode", "explicit", "--load-model", "*", gateway_env=HOUR_CACHE)
    rows = first.model.sample[:16]
    try:
        with grpc.insecure_channel(service(suite, "gateway").address, options=CLIENT_OPTIONS) as channel:
            gateway = gpb_grpc.GatewayServiceStub(channel)
            assert_matches_reference(_predict(gateway, rows, "inplace")[1], first.predict(rows))

            replaced = Reference(train_classifier(models, "inplace", 1, seed=11, feature_names=NAMES[::-1]))
            with grpc.insecure_channel(service(suite, "predictor").address) as predictor_channel:
                pb_grpc.GRPCInferenceServiceStub(predictor_channel).RepositoryModelLoad(
                    pb.RepositoryModelLoadRequest(model_name="inplace"), timeout=60
                )
            versions, outputs = _predict(gateway, rows, "inplace")
    finally:
        suite.stop()
    assert versions == ["1"] * len(rows)
    expected = replaced.predict(rows[:, ::-1])
    assert_matches_reference(outputs, expected)
    assert not np.allclose(expected["probabilities"], replaced.predict(rows)["probabilities"])
