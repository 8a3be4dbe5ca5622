"""Against a running model manager: `fresco models register` with a test report and a drift policy, bad reports
refused naming the field, the safety score in `fresco models show` and GetSafetyScore, and `fresco models report`
writing a page whose sections and images parse back."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import json_format

from fresco.api.features.v1 import statistics_pb2 as spb
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as pb_grpc
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.suite import ServiceProcess
from tests.model_manager.monitor_support import SCORE, message, scores, sketch, sketches_of, traffic
from tests.model_manager.monitor_support import register as register_monitored
from tests.model_manager.quality_support import batch
from tests.model_manager.quality_support import window as records_window
from tests.model_manager.registry_support import report, signature, statistics
from tests.model_manager.rollout_support import LocalFleet, LocalHub, manager
from tests.model_manager.test_registry_evidence import COBERTURA, JUNIT
from tests.unit.test_model_report import Page

pytestmark = pytest.mark.integration

FRESCO = [sys.executable, "-m", "fresco.cli", "models"]
PASSING = b'<testsuite name="m" tests="12" failures="0" errors="0"><testcase name="t"/></testsuite>'


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    root = tmp_path_factory.mktemp("safety")
    process = ServiceProcess("model_manager", ["--data-dir", str(root), "--port", "0", "--metrics-port", "-1"]).start()
    try:
        process.wait_healthy(60)
        yield process
    finally:
        assert process.stop() == 0


def fresco(service: ServiceProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "FRESCO_MODEL_MANAGER": service.address}
    return subprocess.run([*FRESCO, *args], capture_output=True, text=True, timeout=120, env=env, check=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("files")
    paths = {name: root / name for name in ("model.onnx", "junit.xml", "passing.xml", "coverage.xml", "bad.xml")}
    paths["model.onnx"].write_bytes(b"bytes of a model" * 100)
    paths["junit.xml"].write_bytes(JUNIT)
    paths["passing.xml"].write_bytes(PASSING)
    paths["coverage.xml"].write_bytes(COBERTURA)
    paths["bad.xml"].write_bytes(b"<testsuite tests='3'")
    for name, content in (
        ("policy.json", rpb.DriftPolicy(defaults=rpb.DriftLimits(max_psi=0.2), min_rows=200)),
        ("statistics.json", spb.FeatureViewStatistics(features=statistics())),
        ("report.json", report()),
        ("signature.json", signature()),
    ):
        paths[name] = root / name
        paths[name].write_text(json_format.MessageToJson(content))
    return paths


def register(service: ServiceProcess, files: dict[str, Path], name: str, *extra: str) -> None:
    done = fresco(
        service, "register", "--name", name, "--version-file", str(files["model.onnx"]),
        "--signature", str(files["signature.json"]), "--training-statistics", str(files["statistics.json"]),
        "--report", str(files["report.json"]), *extra,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_register_stores_the_summary_and_policy_and_show_prints_the_score(
    service: ServiceProcess, files: dict[str, Path]
) -> None:
    register(service, files, "scored", "--junit-xml", str(files["passing.xml"]),
             "--coverage-xml", str(files["coverage.xml"]), "--drift-policy", str(files["policy.json"]))  # fmt: skip
    register(service, files, "scored", "--junit-xml", str(files["junit.xml"]))
    with grpc.insecure_channel(service.address) as channel:
        stub = pb_grpc.ModelManagerServiceStub(channel)
        first = stub.GetModelVersion(pb.GetModelVersionRequest(model_name="scored", version=1)).model_version
        assert (first.test_summary.tests, first.test_summary.failures) == (12, 0)
        assert first.test_summary.line_coverage == pytest.approx(0.8712)
        assert first.drift_policy.defaults.max_psi == pytest.approx(0.2)
        assert first.drift_policy.min_rows == 200
        score = stub.GetSafetyScore(pb.GetSafetyScoreRequest(model_name="scored")).safety_score
        with pytest.raises(grpc.RpcError) as unknown:
            stub.GetSafetyScore(pb.GetSafetyScoreRequest(model_name="nobody"))
        with pytest.raises(grpc.RpcError) as bad:
            stub.GetSafetyScore(pb.GetSafetyScoreRequest(model_name="no such/name"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert (unknown.value.details() or "").startswith("model_name: no model named 'nobody'")
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model_name" in (bad.value.details() or "")
    parts = {p.name: p for p in score.parts}
    assert (parts["unit_tests"].covered, parts["unit_tests"].total) == (1, 2)
    assert list(parts["unit_tests"].missing) == ["v2: 1 failed and 1 errored of 5 tests"]
    assert parts["offline_evaluation"].total == 0
    assert score.score == pytest.approx(100 * 0.5 / 4)
    shown = fresco(service, "show", "scored")
    assert shown.returncode == 0, shown.stderr
    assert "Safety score of scored: 12 / 100" in shown.stdout
    assert "v2: 1 failed and 1 errored of 5 tests" in shown.stdout
    assert "no version has reached production yet" in shown.stdout
    full = json.loads(fresco(service, "show", "scored", "--version", "2").stdout)
    assert full["test_summary"]["tests"] == "5"


def test_an_unreadable_report_is_refused_naming_the_field(service: ServiceProcess, files: dict[str, Path]) -> None:
    done = fresco(service, "register", "--name", "refused", "--version-file", str(files["model.onnx"]),
                  "--junit-xml", str(files["bad.xml"]))  # fmt: skip
    assert done.returncode == 1
    assert "INVALID_ARGUMENT" in done.stderr
    assert "metadata.test_report.junit_xml: expected well-formed XML" in done.stderr
    policy = files["policy.json"].parent / "negative.json"
    policy.write_text(json.dumps({"overrides": {"users:age": {"maxKs": -1}}}))
    done = fresco(service, "register", "--name", "refused", "--version-file", str(files["model.onnx"]),
                  "--drift-policy", str(policy))  # fmt: skip
    assert done.returncode == 1
    assert "metadata.drift_policy.overrides[users:age].max_ks: expected a finite number of 0 or more" in done.stderr
    with grpc.insecure_channel(service.address) as channel:
        versions = pb_grpc.ModelManagerServiceStub(channel).ListModelVersions(
            pb.ListModelVersionsRequest(model_name="refused")
        )
    assert list(versions.model_versions) == []


def test_report_writes_a_self_contained_page(service: ServiceProcess, files: dict[str, Path], tmp_path: Path) -> None:
    register(service, files, "reported", "--junit-xml", str(files["passing.xml"]))
    out = tmp_path / "report" / "v1.html"
    done = fresco(service, "report", "reported", "1", "--html", str(out))
    assert done.returncode == 0, done.stderr
    page = Page(out.read_text())
    assert page.sections == ["data-quality", "feature-importance", "metrics", "calibration", "drift", "safety"]
    assert [section for section, _ in page.images] == ["feature-importance", "calibration"]
    assert page.external == []
    assert "users:age" in page.text["data-quality"]
    assert "no live data" in page.text["drift"]
    assert "no backtest report" in page.text["metrics"]
    assert "score " in page.text["safety"]
    missing = fresco(service, "report", "reported", "9", "--html", str(tmp_path / "none.html"))
    assert missing.returncode == 1
    assert "NOT_FOUND" in missing.stderr
    assert not (tmp_path / "none.html").exists()


async def test_live_sketches_cover_monitoring_and_draw_the_drift_since_release(tmp_path: Path) -> None:
    alerts = Path(__file__).parents[2] / "deploy" / "prometheus" / "alerts.yml"
    settings: dict[str, object] = {"drift_refresh_s": 300, "alert_rules": [alerts]}
    async with manager(tmp_path / "mm", LocalFleet(), LocalHub(), **settings) as (mm, stub):
        assert mm.registry is not None
        model = register_monitored(mm.registry)  # v1 in production, trained on the three features and the score
        columns = traffic(8, 2000, {"users:spend": 0.7})
        sketches = [*sketches_of({k: v for k, v in columns.items() if k != "users:visits"}),
                    sketch("probability", scores(8, 2000), SCORE)]  # fmt: skip
        window = message(model, 1, sketches, end=time.time() - 1)
        assert (await stub.ReportMetrics(pb.ReportMetricsRequest(gateway_id="gw", windows=[window]))).accepted_windows
        now_us = int(time.time() * 1e6) - 2_000_000
        predicted = scores(9, 300)
        records = [(f"r-{i}", now_us, float(p)) for i, p in enumerate(predicted)]
        answered = await stub.ReportMetrics(
            pb.ReportMetricsRequest(gateway_id="gw", windows=[records_window(model, 1, records, now_us + 1_000_000)])
        )
        assert answered.accepted_windows == 1
        outcomes = np.random.default_rng(10).random(300) < predicted
        labels = batch([(f"r-{i}", float(y)) for i, y in enumerate(outcomes)], model=model)
        acks = [a async for a in stub.LogLabels(iter([labels]))]
        assert acks[0].accepted == 300
        score = (await stub.GetSafetyScore(pb.GetSafetyScoreRequest(model_name=model))).safety_score
        monitoring = {p.name: p for p in score.parts}["monitoring"]
        assert (monitoring.covered, monitoring.total) == (4, 5)  # users:visits sent nothing; the rules cover drift
        assert list(monitoring.missing) == [
            "v1 feature users:visits: no live drift monitor (no sketches in the last 1 h)"
        ]

        out = tmp_path / "v1.html"
        env = {**os.environ, "FRESCO_MODEL_MANAGER": mm.app.address}
        process = await asyncio.create_subprocess_exec(
            *FRESCO, "report", model, "1", "--html", str(out), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode == 0, err.decode()
    page = Page(out.read_text())
    # No importance or training calibration was registered: the calibration drawn is the live one.
    assert [section for section, _ in page.images] == ["calibration", "drift"]
    assert "live (" in page.text["calibration"]
    assert "accuracy" in page.text["metrics"]
    assert "no labelled predictions" not in page.text["metrics"]
    assert "no live data" not in page.text["drift"]
    assert "drifted: users:spend" in page.text["drift"]
    assert "users:visits" in page.text["drift"]
