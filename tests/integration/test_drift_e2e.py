"""Acceptance: injected drift on one feature is detected within one window, and only on that feature. Real processes
(fresco.suite.start_platform: the model manager, a predictor in its fleet, a gateway routed by the manager); the
demo classifier registered with its training statistics; seeded held-out rows sent through the gateway, one feature
shifted by 0.75 of its training standard deviation; the gateway's sketches merged by the manager."""

from __future__ import annotations

import asyncio
import math
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from grpc import aio

from fresco.api.gateway.v1 import gateway_pb2_grpc
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import monitoring_pb2 as mpb
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.api.models.v1 import rollout_pb2 as ro
from fresco.cli_models import sha256_of, upload_requests
from fresco.client import predict_request
from fresco.demo import row_features
from fresco.monitoring.training import feature_statistics
from fresco.story import SCORE_OUTPUT, signature
from fresco.suite import issue_local_tokens, start_platform
from fresco.training import ExportedModel, demo_dataset, train_classifier
from model_manager.monitor_store import BUCKET_S
from tests.integration.rollout_platform import (
    RPC_TIMEOUT_S,
    Platform,
    admin,
    apply,
    in_state,
    poll,
    promote,
    wait_rollout,
)

pytestmark = pytest.mark.integration

MODEL = "drift-demo"
SHIFTED = "f3"
SHIFT_SD = 0.75  # at least the 0.5 sd a 1000-row window detects every time (README's power figures)
ROWS = 1500  # above the default min_rows (1000) of a judged window
SEED = 20261202


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    root = tmp_path_factory.mktemp("drift-platform")
    auth = issue_local_tokens(root / "auth")
    suite = start_platform(root, auth, window_s=1.0)
    try:
        with admin(suite.services[0].address, auth) as m:
            yield Platform(suite, auth, root, m)
    finally:
        codes = suite.stop()
    assert all(code == 0 for code in codes.values()), codes


def positive_scores(model: ExportedModel, rows: np.ndarray) -> np.ndarray:
    """The model's positive-class probability of each row, as the predictor computes it."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run([SCORE_OUTPUT], {model.input_name: rows.astype(np.float32)})
    return np.asarray(probabilities)[:, -1].astype(np.float64)


def register_with_statistics(platform: Platform, model: ExportedModel, train: np.ndarray) -> None:
    """Upload v1 with the training statistics of each feature and of its score."""
    m = platform.manager
    m.stub.CreateModel(
        pb.CreateModelRequest(model=rpb.Model(name=MODEL, owner="e2e"), reason="drift acceptance"),
        timeout=RPC_TIMEOUT_S,
        metadata=m.metadata,
    )
    statistics = [feature_statistics(name, train[:, i]) for i, name in enumerate(model.feature_names)]
    statistics.append(feature_statistics(SCORE_OUTPUT, positive_scores(model, train)))
    digest, size = sha256_of(model.path)
    metadata = pb.UploadModelVersionMetadata(
        model_name=MODEL,
        format=rpb.MODEL_FORMAT_ONNX,
        signature=signature(model),
        expected_sha256=digest,
        expected_size_bytes=size,
        version=1,
        training_statistics=statistics,
        reason="drift acceptance",
    )
    m.stub.UploadModelVersion(upload_requests(metadata, model.path), timeout=RPC_TIMEOUT_S, metadata=m.metadata)


async def send(address: str, names: list[str], rows: np.ndarray) -> int:
    """Every row through the gateway, 16 calls in flight; how many were answered."""
    async with aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        answered = 0
        for start in range(0, len(rows), 16):
            calls = [
                stub.Predict(predict_request(MODEL, row_features(names, row)), timeout=RPC_TIMEOUT_S)
                for row in rows[start : start + 16]
            ]
            answered += len(await asyncio.gather(*calls))
        return answered


def monitor(platform: Platform) -> mpb.VersionMonitor:
    m = platform.manager
    reply = m.stub.GetModelMonitor(
        pb.GetModelMonitorRequest(model_name=MODEL, versions=[1]), timeout=RPC_TIMEOUT_S, metadata=m.metadata
    )
    return reply.versions[0]


def five_minutes(feature: mpb.FeatureMonitor) -> mpb.FeatureDriftWindow:
    return next(w for w in feature.windows if w.window == "5m")


def test_injected_drift_on_one_feature_is_flagged_in_the_first_window_and_on_no_other(
    platform: Platform, tmp_path: Path
) -> None:
    model = train_classifier(tmp_path / "models", name=MODEL)
    data = demo_dataset()
    register_with_statistics(platform, model, data.train_features.astype(np.float64))
    promote(platform.manager, MODEL, 1)
    apply(platform.manager, MODEL, 1, ro.RolloutStrategy(blue_green=ro.BlueGreenStrategy()))
    wait_rollout(platform.manager, MODEL, in_state(ro.ROLLOUT_STATE_SUCCEEDED))

    rng = np.random.default_rng(SEED)
    rows = data.holdout_features[rng.integers(0, len(data.holdout_features), size=ROWS)].astype(np.float64)
    column = model.feature_names.index(SHIFTED)
    rows[:, column] += SHIFT_SD * float(data.train_features[:, column].std())
    # All the rows in one 5-minute bucket, so the bucket's own PSI (the history's last point) is judged too: a send
    # that would straddle a bucket boundary waits for the next bucket to begin.
    to_boundary = BUCKET_S - time.time() % BUCKET_S
    if to_boundary < 45:
        time.sleep(to_boundary + 1)
    assert asyncio.run(send(platform.gateway_address, model.feature_names, rows)) == ROWS

    def all_reported(v: mpb.VersionMonitor) -> bool:
        features = [f for f in v.features if f.kind == mpb.VALUE_SKETCH_KIND_FEATURE]
        return len(features) == len(model.feature_names) and all(five_minutes(f).count == ROWS for f in features)

    started = time.monotonic()
    version = poll(lambda: monitor(platform), all_reported, timeout_s=60)
    assert time.monotonic() - started < 60

    features = {f.name: f for f in version.features if f.kind == mpb.VALUE_SKETCH_KIND_FEATURE}
    assert list(features) == model.feature_names, "inputs in signature order"
    flagged = {name for name, f in features.items() if five_minutes(f).drifted}
    assert flagged == {SHIFTED}, "the shifted feature, and only it, drifted in the first 5-minute window"
    shifted = five_minutes(features[SHIFTED])
    assert shifted.judged
    psi = next(m for m in shifted.measures if m.statistic == mpb.DRIFT_STATISTIC_PSI)
    assert psi.breached
    assert psi.value > psi.threshold
    for name, f in features.items():
        window = five_minutes(f)
        assert window.judged, name
        assert window.drifted == (name == SHIFTED), (name, list(window.measures))
    assert SHIFTED in version.drifted_features, "the 1h window that drifted_features judges holds the same rows"
    assert [n for n in version.drifted_features if n in features] == [SHIFTED]
    history = list(features[SHIFTED].psi_history)
    assert any(not math.isnan(v) and v > 0.1 for v in history[-2:]), "the current 5-minute bucket shows it"

    # The same verdict on the manager's /metrics, once its background refresh has run over all the rows (an earlier
    # refresh may have seen a partial, unjudged window: wait for the values gauge to count every row).
    def gauge(name: str) -> dict[str, float]:
        text = urllib.request.urlopen(platform.suite.services[0].metrics_url, timeout=10).read().decode()
        wanted = (f"{name}{{", f'model="{MODEL}"', 'window="5m"', 'kind="feature"')
        out = {}
        for line in text.splitlines():
            if all(part in line for part in wanted):
                out[line.split('feature="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
        return out

    def refreshed() -> dict[str, float]:
        values = gauge("fresco_feature_drift_values")
        if len(values) < len(model.feature_names) or any(v != ROWS for v in values.values()):
            return {}
        return gauge("fresco_feature_drift_breached")

    gauges = poll(refreshed, lambda found: len(found) == len(model.feature_names), timeout_s=60, every_s=0.5)
    assert {name for name, value in gauges.items() if value == 1.0} == {SHIFTED}
