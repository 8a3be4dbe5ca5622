"""`fresco experiments` end to end against a running experiment service with auth on: files checked before any call,
the lifecycle with expected versions, phases and the audit log, and each failure as one line with its status."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fresco.suite import LocalAuth, ServiceProcess, issue_local_tokens

pytestmark = pytest.mark.integration

FRESCO = [sys.executable, "-m", "fresco.cli", "experiments"]
REPOSITORY = Path(__file__).resolve().parents[2]
EXAMPLE = REPOSITORY / "examples" / "experiments" / "demo-v2-vs-v1.yaml"


@pytest.fixture(scope="module")
def auth(tmp_path_factory: pytest.TempPathFactory) -> LocalAuth:
    return issue_local_tokens(tmp_path_factory.mktemp("auth"))


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, auth: LocalAuth) -> Iterator[ServiceProcess]:
    state = tmp_path_factory.mktemp("experiments")
    args = ["--state-dir", str(state), "--port", "0", "--metrics-port", "-1", *auth.service_args()]
    process = ServiceProcess("experiment_service", args, security=auth.admin).start()
    try:
        process.wait_healthy(60)
        yield process
    finally:
        assert process.stop() == 0


def fresco(service: ServiceProcess, auth: LocalAuth | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "220", "FRESCO_EXPERIMENT_SERVICE": service.address}
    env.pop("FRESCO_TOKEN", None)
    env.pop("FRESCO_TOKEN_FILE", None)
    if auth is not None:
        env["FRESCO_TOKEN_FILE"] = str(auth.admin_token_file)
    return subprocess.run([*FRESCO, *args], capture_output=True, text=True, timeout=120, env=env, check=False)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def flat(text: str) -> str:
    return " ".join(text.split())


def experiment_file(tmp_path: Path, key: str) -> Path:
    path = tmp_path / f"{key}.yaml"
    path.write_text(EXAMPLE.read_text().replace("key: demo-v2-vs-v1", f"key: {key}"))
    return path


def version_of(shown: str) -> int:
    match = re.search(r"experiment\s+\S+ · version (\d+)", shown)
    assert match, shown
    return int(match.group(1))


def test_the_lifecycle_with_expected_versions_phases_and_audit(
    service: ServiceProcess, auth: LocalAuth, tmp_path: Path
) -> None:
    key = "cli-lifecycle"
    created = ok(fresco(service, auth, "create", str(experiment_file(tmp_path, key))))
    assert flat(created) == f"created {key} (version 1): DRAFT, control v1 90% · treatment v2 10%"

    listed = ok(fresco(service, auth, "list"))
    assert re.search(rf"│ {key}\s+│ DRAFT\s+│ ab\s+│ demo\s+│ control v1 90% · treatment v2 10%", listed), listed
    assert key not in ok(fresco(service, auth, "list", "--status", "running"))

    started = ok(fresco(service, auth, "start", key))
    assert flat(started).startswith(f"started {key} (version 2): RUNNING, phase 1, control v1 90%")
    again = fresco(service, auth, "start", key)
    assert again.returncode == 1
    assert flat(again.stderr).startswith("start failed: FAILED_PRECONDITION:")
    assert key in ok(fresco(service, auth, "list", "--status", "running", "--status", "stopped"))

    stale = fresco(service, auth, "update", key, "--weights", "control=0.5,treatment=0.5", "--expected-version", "1")
    assert stale.returncode == 1
    assert flat(stale.stderr).startswith("update failed: ABORTED:")
    reweighted = ok(fresco(service, auth, "update", key, "--weights", "control=0.5,treatment=0.5"))
    assert (
        flat(reweighted)
        == f"updated {key} (version 3): RUNNING, phase 2, control v1 50% · treatment v2 50%; phase 2 started"
    )
    covered = ok(fresco(service, auth, "update", key, "--coverage", "0.3", "--expected-version", "3"))
    assert flat(covered).startswith(f"updated {key} (version 4): RUNNING, phase 2,")

    stopped = ok(fresco(service, auth, "stop", key, "--reason", "enough data"))
    assert flat(stopped).startswith(f"stopped {key} (version 5): STOPPED")

    shown = ok(fresco(service, auth, "show", key))
    assert version_of(shown) == 5
    for expected in (
        "status STOPPED",
        "coverage 30.00%",
        "min units per arm 10,000",
        "max duration 14d",
        "stopped",
        "enough data",
        "min_lift accuracy >= +2.00%",
        "max_regression latency_ms <= 10.00%",
    ):
        assert expected in flat(shown), expected
    phases = shown[shown.index("Phases") :]
    assert re.search(r"│ 1\s+│ control 90% · treatment 10%\s+│ 2\s+│", phases), phases
    assert re.search(r"│ 2\s+│ control 50% · treatment 50%\s+│ 3\s+│", phases), phases
    audit = shown[shown.index("Audit") :]
    actions = re.findall(r"│ (\d+)\s+│ [\d-]+ [\d:]+\s+│ (\S+)\s+│ (\S+)\s+│", audit)
    assert [(int(v), who, action) for v, who, action in actions] == [
        (1, "admin", "create"),
        (2, "admin", "start"),
        (3, "admin", "update"),
        (4, "admin", "update"),
        (5, "admin", "stop"),
    ]


def test_create_and_start_at_once_with_the_template_flag(
    service: ServiceProcess, auth: LocalAuth, tmp_path: Path
) -> None:
    path = tmp_path / "bare.yaml"
    path.write_text(
        "key: cli-bare\nmodel: demo\nunit_type: user_id\narms: [{name: a, version: 1}, {name: b, version: 2}]\n"
    )
    created = ok(fresco(service, auth, "create", str(path), "--template", "michelangelo", "--start"))
    lines = [flat(line) for line in created.splitlines()]
    assert lines == [
        "created cli-bare (version 1): DRAFT, a v1 90% · b v2 10%",
        "started cli-bare (version 2): RUNNING, phase 1, a v1 90% · b v2 10%",
    ]
    shown = flat(ok(fresco(service, auth, "show", "cli-bare")))
    assert "business_kpi" in shown
    assert "statistics alpha 0.05, power 0.8" in shown


def test_a_bad_file_is_refused_before_any_call(service: ServiceProcess, auth: LocalAuth, tmp_path: Path) -> None:
    path = experiment_file(tmp_path, "cli-bad")
    path.write_text(path.read_text().replace("kind: proportion", "kind: avg").replace("unit_type:", "unit_typ:"))
    refused = fresco(service, auth, "create", str(path))
    assert refused.returncode == 2
    assert "is not a valid experiment file" in refused.stderr
    assert "metrics[0].kind: expected one of mean, proportion, ratio, got 'avg'" in refused.stderr
    assert "unit_typ: unknown field (did you mean unit_type?)" in refused.stderr
    assert "cli-bad" not in ok(fresco(service, auth, "list"))


def test_failures_print_one_line_with_the_status(service: ServiceProcess, auth: LocalAuth, tmp_path: Path) -> None:
    missing = fresco(service, auth, "show", "no-such-experiment")
    assert missing.returncode == 1
    assert flat(missing.stderr).startswith("show failed: NOT_FOUND:")
    assert "no-such-experiment" in missing.stderr
    path = experiment_file(tmp_path, "cli-twice")
    # Reads are open; changes need a deployer's token.
    anonymous = fresco(service, None, "create", str(path))
    assert anonymous.returncode == 1
    assert flat(anonymous.stderr).startswith("create failed: UNAUTHENTICATED:")
    ok(fresco(service, auth, "create", str(path)))
    twice = fresco(service, auth, "create", str(path))
    assert twice.returncode == 1
    assert flat(twice.stderr).startswith("create failed: ALREADY_EXISTS:")
    unknown_arm = fresco(service, auth, "update", "cli-twice", "--weights", "control=1,other=1")
    assert unknown_arm.returncode == 2
    assert "expected one of the arms (control, treatment), got 'other'" in flat(unknown_arm.stderr)
    # The service's own validation names the field too: weights that do not make a positive total.
    zero = fresco(service, auth, "update", "cli-twice", "--weights", "control=0,treatment=0")
    assert zero.returncode == 1
    assert flat(zero.stderr).startswith("update failed: INVALID_ARGUMENT:")
    assert "arms" in zero.stderr
