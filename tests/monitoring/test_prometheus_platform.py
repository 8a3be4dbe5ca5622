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
from model_manager.alert_rules import metric_names
from tests.integration.rollout_platform import (
    RPC_TIMEOUT_S,
    Traffic,
    Versions,
    admin,
    apply,
    create_model,
    in_state,
    promote,
    register,
    serve_first,
    wait_rollout,
)
from tests.monitoring.dashboards import load_all, queries, substitute
from tests.monitoring.prometheus_platform import (
    World,
    fetch_features,
    label_predictions,
    register_with_statistics,
    run_experiment,
    series,
    start_feature_service,
    start_prometheus,
    wait_for,
)

pytestmark = pytest.mark.integration

ERROR_ALERT = "FrescoPredictionErrorRateHigh"
BOARDS = load_all()


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
    # Drift gauges and quality gauges refreshed every second, not every 5 and 30.
    refresh = {"FRESCO_MODEL_MANAGER_DRIFT_REFRESH_S": "1", "FRESCO_MODEL_MANAGER_QUALITY_REFRESH_S": "1"}
    suite = start_platform(root, auth, env=refresh, window_s=0.5, experiments=True)
    try:
        start_feature_service(suite, root, auth)
        prometheus = start_prometheus(suite, root)
    except BaseException:
        suite.stop()
        raise
    try:
        yield World(suite, auth, prometheus, root)
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
            first = wait_for(lambda: error_alerts(world, model), lambda a: "3" in a, 90, "v3's alert")["3"]
            firing = wait_for(
                lambda: error_alerts(world, model), lambda a: a.get("3", {}).get("state") == "firing", 60, "firing"
            )
    alert = firing["3"]
    assert alert["activeAt"] == first["activeAt"]  # one alert: active (pending) since then, firing after its for:
    assert alert["labels"] == {"alertname": ERROR_ALERT, "model": model, "version": "3", "severity": "critical"}
    assert float(alert["value"]) > 0.01
    assert alert["annotations"]["summary"].startswith(f"{model} v3: error rate ")
    assert "1" not in firing  # v1, the fallback, answered every request it got
    # Prometheus records each evaluation's state in ALERTS: pending at every evaluation until `for:` had passed, then
    # firing; read from its TSDB, so no poll has to catch the few seconds of pending.
    states = world.prometheus.query(f'ALERTS{{alertname="{ERROR_ALERT}", model="{model}", version="3"}}[10m]')
    times = {s["metric"]["alertstate"]: [float(t) for t, _ in s["values"]] for s in series(states)}
    assert set(times) == {"pending", "firing"}, times
    assert max(times["pending"]) < min(times["firing"])


GPU = "no GPU on this machine: predictor/gpu_metrics.py exports GPU series only where NVML sees a GPU"
# Queries reading these metrics cannot return series here; each must still parse and evaluate.
NO_SERIES_HERE = {
    "fresco_gpu_utilization_ratio": GPU,
    "fresco_gpu_memory_used_bytes": GPU,
    "fresco_gpu_memory_total_bytes": GPU,
}


def test_every_dashboard_query_evaluates_and_returns_series(world: World, versions: Versions, rows: np.ndarray) -> None:
    model = "ranker"
    with admin(world.suite.service("model_manager").address, world.auth) as m:
        create_model(m, model)
        register_with_statistics(m, model, versions.v1, 1, demo_dataset().train_features)  # drift is measured
        promote(m, model, 1)
        apply(m, model, 1, ro.RolloutStrategy(blue_green=ro.BlueGreenStrategy()))  # a rollout to v1
        wait_rollout(m, model, in_state(ro.ROLLOUT_STATE_SUCCEEDED))
        register(m, model, versions.v2, 2)  # the experiment's treatment arm
        label_predictions(world, m, model, versions.v1)  # late labels: prediction quality
    exposed = run_experiment(world, model, versions.v1.feature_names, rows)
    fetch_features(world, world.root)

    # The new operational metrics say what happened: the rollout succeeded, v1 takes all live traffic, and every
    # unit the gateway exposed was recorded once.
    prometheus = world.prometheus
    wait_for(
        lambda: series(prometheus.query(f'fresco_rollout_state{{model="{model}"}} == 1')),
        lambda found: [s["metric"]["state"] for s in found] == ["SUCCEEDED"],
        30,
        "the rollout's state",
    )
    wait_for(  # v2 is routed at weight 0 while the experiment holds it: only its arm's units reach it
        lambda: {
            s["metric"]["version"]: float(s["value"][1])
            for s in series(prometheus.query(f'fresco_route_traffic_share{{model="{model}"}}'))
        },
        lambda shares: shares == {"1": 1.0, "2": 0.0},
        30,
        "the route's traffic shares",
    )
    wait_for(
        lambda: series(prometheus.query('sum(fresco_experiment_exposures_total{outcome="accepted"})')),
        lambda found: bool(found) and float(found[0]["value"][1]) == exposed,
        30,
        f"{exposed} exposures accepted",
    )

    everything = [q for name, board in BOARDS.items() for q in queries(name, board)]
    exempt = {q.where: q for q in everything if metric_names(q.expr) & NO_SERIES_HERE.keys()}
    required = [q for q in everything if q.where not in exempt]

    def missing() -> list[str]:
        return [q.where for q in required if not series(prometheus.query(substitute(q.expr, BOARDS[q.dashboard])))]

    wait_for(missing, lambda left: not left, 60, "queries without series")
    for query in [*required, *exempt.values()]:
        answer = prometheus.query(substitute(query.expr, BOARDS[query.dashboard]))
        assert answer["status"] == "success", (query.where, answer)
    assert {n for q in exempt.values() for n in metric_names(q.expr)} <= NO_SERIES_HERE.keys()
    assert len(exempt) == 2  # the two GPU panels, nothing else
