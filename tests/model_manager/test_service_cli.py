"""`fresco models register|list|show|alias` end to end against a running model manager."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fresco.suite import ServiceProcess

pytestmark = pytest.mark.integration

FRESCO = [sys.executable, "-m", "fresco.cli", "models"]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    root = tmp_path_factory.mktemp("cli")
    args = ["--data-dir", str(root), "--port", "0", "--metrics-port", "-1"]
    process = ServiceProcess("model_manager", args).start()
    try:
        process.wait_healthy(60)
        yield process
    finally:
        assert process.stop() == 0


def fresco(service: ServiceProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "FRESCO_MODEL_MANAGER": service.address}
    return subprocess.run([*FRESCO, *args], capture_output=True, text=True, timeout=120, env=env, check=False)


def test_register_list_show_and_alias(service: ServiceProcess, tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not really onnx, but bytes all the same" * 1000)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"metrics": {"auc": 0.9}, "slices": [{"slice": "country=FR", "count": 10}]}))
    registered = fresco(
        service,
        "register",
        "--name", "churn",
        "--version-file", str(model),
        "--owner", "risk",
        "--code-commit", "abc123",
        "--metric", "logloss=0.3",
        "--report", str(report),
        "--reason", "first model",
    )  # fmt: skip
    assert registered.returncode == 0, registered.stderr
    assert "created model churn" in registered.stdout
    assert f"registered churn version 1 ({model.stat().st_size} bytes, sha256 {digest}) stage registered" in (
        registered.stdout.replace("\n", " ")
    )
    again = fresco(service, "register", "--name", "churn", "--version-file", str(model), "--parent-version", "1")
    assert again.returncode == 0, again.stderr
    assert "created model" not in again.stdout
    assert "registered churn version 2" in again.stdout

    listed = fresco(service, "list")
    assert listed.returncode == 0, listed.stderr
    assert "churn" in listed.stdout
    assert "risk" in listed.stdout

    aliased = fresco(service, "alias", "churn", "champion", "1", "--reason", "best so far")
    assert (aliased.returncode, aliased.stdout.strip()) == (0, "alias champion of churn → version 1")
    moved = fresco(service, "alias", "churn", "champion", "2")
    assert "(was version 1)" in moved.stdout

    shown = fresco(service, "show", "churn")
    assert shown.returncode == 0, shown.stderr
    rows = [line for line in shown.stdout.splitlines() if "abc123" in line or "champion" in line]
    assert len(rows) == 2  # version 1 carries the commit; version 2 the alias
    detail = fresco(service, "show", "churn", "--alias", "champion")
    assert detail.returncode == 0, detail.stderr
    version = json.loads(detail.stdout)
    assert (version["version"], version["lineage"]["parent_version"], version["aliases"]) == ("2", "1", ["champion"])
    first = json.loads(fresco(service, "show", "churn", "--version", "1").stdout)
    assert first["report"]["metrics"] == {"auc": 0.9, "logloss": 0.3}
    assert first["report"]["slices"] == [{"slice": "country=FR", "count": "10"}]
    assert first["created_by"] == "anonymous"

    removed = fresco(service, "alias", "churn", "champion", "--delete")
    assert "removed alias champion of churn (was version 2)" in removed.stdout


def test_errors_are_one_line_with_the_code(service: ServiceProcess, tmp_path: Path) -> None:
    missing = fresco(service, "show", "never-made")
    assert missing.returncode == 1
    assert "show failed: NOT_FOUND: name: no model named 'never-made'" in missing.stderr
    bad = fresco(service, "alias", "never-made", "Bad Alias", "1")
    assert bad.returncode == 1
    assert "alias failed: INVALID_ARGUMENT: alias: expected an alias" in bad.stderr.replace("\n", " ")
    both = fresco(service, "alias", "x", "champion", "1", "--delete")
    assert both.returncode == 2
    assert "give a VERSION, or --delete without one" in both.stderr
