"""The Prometheus launcher against a real prometheus: it scrapes a live /metrics endpoint, answers queries (and says
why a bad one is bad), and the fast copy of the alert rules keeps every expression and passes promtool."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter

from chassis.metrics import MetricsEndpoint
from fresco.servers import PrometheusServer
from fresco.servers.prometheus import fast_rules, scrape_target

pytestmark = pytest.mark.integration

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"


def test_scrapes_a_live_endpoint_and_answers_queries(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    Counter("launcher_probe", "Probe counter.", ["side"], registry=registry).labels("a").inc(7)
    endpoint = MetricsEndpoint(registry, "127.0.0.1", 0)
    try:
        target = scrape_target(f"http://127.0.0.1:{endpoint.port}/metrics")
        with PrometheusServer({"probe": [target]}, data_dir=tmp_path) as prometheus:
            deadline = time.monotonic() + 30
            answer = prometheus.query("launcher_probe_total")
            while not answer["data"]["result"] and time.monotonic() < deadline:
                time.sleep(0.1)
                answer = prometheus.query("launcher_probe_total")
            (series,) = answer["data"]["result"]
            assert series["metric"] == {"__name__": "launcher_probe_total", "side": "a", "job": "probe",
                                        "instance": target}  # fmt: skip
            assert series["value"][1] == "7"
            bad = prometheus.query("sum(launcher_probe_total")
            assert (bad["status"], bad["errorType"]) == ("error", "bad_data")
            assert prometheus.alerts() == []
        assert prometheus.returncode == 0
    finally:
        endpoint.close()


def test_fast_rules_keep_the_expressions_and_pass_promtool(tmp_path: Path) -> None:
    fast = fast_rules(RULES, tmp_path / "fast.yml", for_s=2.0)
    original, changed = yaml.safe_load(RULES.read_text()), yaml.safe_load(fast.read_text())
    for before, after in zip(original["groups"], changed["groups"], strict=True):
        assert after["interval"] == "1s"
        for rule_before, rule_after in zip(before["rules"], after["rules"], strict=True):
            assert rule_after["expr"] == rule_before["expr"]
            assert rule_after["annotations"] == rule_before["annotations"]
            assert rule_after["for"] == "2s"
    promtool = shutil.which("promtool")
    assert promtool is not None
    checked = subprocess.run([promtool, "check", "rules", str(fast)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
