"""A real Prometheus scraping the running platform: a version that fails on live traffic raises the error-rate alert,
pending first and then firing, while the healthy version raises none; and every query of every Grafana dashboard
parses and returns series once the platform has served what the dashboards show."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import rollout_pb2 as ro
from fresco.suite import issue_local_tokens, start_platform
from fresco.training import demo_dataset, train_better_classifier, train_classifier, write_failing_model
from tests.integration.rollout_platform import (
    RPC_TIMEOUT_S,
    Traffic,
    Versions,
    admin,
    in_state,
    serve_first,
    wait_rollout,
)
from tests.monitoring.prometheus_platform import World, start_feature_service, start_prometheus, wait_for

pytestmark = pytest.mark.integration

ERROR_ALERT = "FrescoPredictionErrorRateHigh"


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> Versions:
    repository = tmp_path_factory.mktemp("models")
    v1 = train_classifier(repository)
    return Versions(v1, train_better_classifier(repository), write_failing_model(v1, repository))


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    """Held-out rows, most of which make v3 fail (|f0| >= 0.5)."""
    return demo_dataset().holdout_features[:400]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("scraped")
    auth = issue_local_tokens(root / "auth")
    suite = start_platform(root, auth, window_s=0.5, experiments=True)
    try:
        start_feature_service(suite, root, auth)
        prometheus = start_prometheus(suite, root)
    except BaseException:
        suite.stop()
        raise
    try:
        yield World(suite, auth, prometheus)
    finally:
        prometheus.close()
        codes = suite.stop()
    assert prometheus.returncode == 0
    assert all(code == 0 for code in codes.values()), codes


def error_alerts(world: World, model: str) -> dict[str, dict[str, Any]]:
    """The error-rate alerts of `model` now, by version."""
    return {
        a["labels"]["version"]: a
        for a in world.prometheus.alerts()
        if a["labels"]["alertname"] == ERROR_ALERT and a["labels"].get("model") == model
    }


def test_a_failing_version_raises_the_error_rate_alert_pending_then_firing(
    world: World, versions: Versions, rows: np.ndarray
) -> None:
    model = "faulty"
    with admin(world.suite.service("model_manager").address, world.auth) as m:
        serve_first(m, model, versions, (1, 3))
        with Traffic(world.suite.service("gateway").address, model, versions.v1.feature_names, rows, concurrency=2):
            # Healthy v1 under traffic: scraped, and no alert.
            wait_for(
                lambda: world.prometheus.query(f'fresco_model_requests_total{{model="{model}.v1",outcome="success"}}'),
                lambda a: bool(a["data"]["result"]) and float(a["data"]["result"][0]["value"][1]) > 20,
                60,
                "v1's successful requests in Prometheus",
            )
            assert error_alerts(world, model) == {}
            # The fault: v3 takes all traffic (blue-green, no analysis, no automatic rollback) and fails most rows;
            # the gateway answers those from the fallback, v1, so only v3's own counters see the errors.
            deployment = pb.Deployment(
                model_name=model, version=3, strategy=ro.RolloutStrategy(blue_green=ro.BlueGreenStrategy()), replicas=1
            )
            request = pb.ApplyDeploymentRequest(deployment=deployment, reason="inject a fault")
            m.stub.ApplyDeployment(request, timeout=RPC_TIMEOUT_S, metadata=m.metadata)
            wait_rollout(m, model, in_state(ro.ROLLOUT_STATE_SUCCEEDED))
            pending = wait_for(lambda: error_alerts(world, model), lambda a: "3" in a, 90, "v3's alert")["3"]
            assert pending["state"] == "pending", pending
            firing = wait_for(
                lambda: error_alerts(world, model), lambda a: a.get("3", {}).get("state") == "firing", 60, "firing"
            )
    alert = firing["3"]
    assert alert["labels"] == {"alertname": ERROR_ALERT, "model": model, "version": "3", "severity": "critical"}
    assert alert["activeAt"] == pending["activeAt"]  # the same alert: pending since then, firing after its for:
    assert float(alert["value"]) > 0.01
    assert alert["annotations"]["summary"].startswith(f"{model} v3: error rate ")
    assert "1" not in firing  # v1, the fallback, answered every request it got
