"""Issue 8's acceptance, with real processes: a model manager restarted mid-rollout (SIGTERM, then a new process on
the same data directory and port) resumes the rollout to its end, while the gateway keeps serving from its last
table and picks up again from its revision, with updates and no snapshot (the new manager serves its last table
again). A platform of its own: the test stops its manager."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fresco.api.models.v1 import rollout_pb2 as ro
from fresco.suite import ServiceProcess, issue_local_tokens, start_platform
from fresco.training import demo_dataset, train_better_classifier, train_classifier
from tests.integration.rollout_platform import (
    Platform,
    Traffic,
    admin,
    apply,
    canary,
    in_state,
    poll,
    serve_first,
    wait_rollout,
)
from tests.integration.rollout_platform import Versions as DemoVersions

pytestmark = pytest.mark.integration


@pytest.fixture
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    root = tmp_path_factory.mktemp("restart")
    auth = issue_local_tokens(root / "auth")
    suite = start_platform(root, auth, window_s=0.5)
    try:
        with admin(suite.services[0].address, auth) as m:
            yield Platform(suite, auth, root, m)
    finally:
        codes = suite.stop()
    assert all(code == 0 for code in codes.values()), codes


def gauge(url: str, name: str) -> float:
    """A gauge of the service's Prometheus endpoint."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} not in {url}")


def applied(url: str) -> dict[str, float]:
    """The route stream messages the gateway applied, by kind (snapshot, update)."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {
        sample.labels["kind"]: float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "fresco_gateway_route_messages_applied_total"
    }


def test_manager_restarted_mid_rollout_resumes_it_while_the_gateway_keeps_serving(
    platform: Platform, tmp_path_factory: pytest.TempPathFactory
) -> None:
    repository = tmp_path_factory.mktemp("models")
    v1 = train_classifier(repository)
    versions = DemoVersions(v1, train_better_classifier(repository), v1)  # no v3 in this test
    rows: np.ndarray = demo_dataset().holdout_features[:400]
    m, model, metrics = platform.manager, "restarted", platform.gateway_metrics_url
    serve_first(m, model, versions)
    old = platform.suite.services[0]
    with Traffic(platform.gateway_address, model, v1.feature_names, rows) as live:
        live.wait_answers(50)
        started = apply(m, model, 2, canary([50], dwell_s=6, min_samples=50)).rollout
        step = wait_rollout(
            m, model, lambda r: r.applied_revision >= r.published_revision > 0 and r.traffic[-1].traffic_percent == 50
        )
        held = gauge(metrics, "fresco_gateway_route_revision")
        assert held >= step.applied_revision
        applied_before = applied(metrics)
        assert applied_before["snapshot"] >= 1, applied_before  # its first table

        assert old.stop() == 0, old.output()[-2000:]
        # Down: the gateway serves from its last table, and says how stale it is.
        poll(lambda: gauge(metrics, "fresco_gateway_route_staleness_seconds"), lambda s: s > 0)
        live.wait_answers(100)
        assert gauge(metrics, "fresco_gateway_route_revision") == held

        port = old.address.rsplit(":", 1)[1]
        args = list(old.args)
        args[args.index("--port") + 1] = port
        new = ServiceProcess("model_manager", args, log_path=platform.root / "model_manager.restarted.log")
        platform.suite.services[0] = new
        new.start()
        new.wait_healthy()
        assert new.address == old.address

        # Back: the gateway reconnects from the revision it holds and the rollout goes on to its end.
        poll(lambda: gauge(metrics, "fresco_gateway_route_staleness_seconds"), lambda s: s == 0, timeout_s=60)
        done = wait_rollout(
            m,
            model,
            in_state(
                ro.ROLLOUT_STATE_SUCCEEDED,
                ro.ROLLOUT_STATE_ROLLED_BACK,
                ro.ROLLOUT_STATE_PAUSED,
                ro.ROLLOUT_STATE_FAILED,
            ),
        )
        assert done.rollout_id == started.rollout_id
        assert done.state == ro.ROLLOUT_STATE_SUCCEEDED, [
            (e.reason, [d.detail for d in e.decisions]) for e in done.events
        ]
        assert gauge(metrics, "fresco_gateway_route_revision") >= done.published_revision > held
        # The restarted manager served its last table again: the gateway resumed from its revision with updates only.
        applied_after = applied(metrics)
        assert applied_after["snapshot"] == applied_before["snapshot"], (applied_before, applied_after)
        assert applied_after["update"] > applied_before["update"], (applied_before, applied_after)
        live.wait_answers(100)
        after = live.since(done.finished_at.seconds + done.finished_at.nanos / 1e9)
    assert not live.failures, live.failures
    assert after
    assert {a.version for a in after} == {"2"}
    log = platform.suite.services[2].output()
    assert "rejected route revision" not in log, log[-3000:]
