"""`fresco experiments` end to end against a running experiment service with auth on: files checked before any call,
the lifecycle with expected versions, phases and the audit log, and each failure as one line with its status."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_service_pb2 as spb
from fresco.api.experiments.v1 import experiment_service_pb2_grpc as spb_grpc
from fresco.experiments.exposure import exposure_id
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


RESULTS_FILE = """
key: cli-results
hypothesis: v2 is more accurate and no slower
model: demo
unit_type: user_id
arms: [{name: control, version: 1}, {name: treatment, version: 2}]
min_units_per_arm: 100
metrics:
  - {name: accuracy, kind: proportion, mde: 0.02}
  - {name: latency_ms, role: latency, kind: mean, direction: decrease, margin: 0.1}
  - {name: kpi, kind: mean, mde: 0.05, cuped: {covariate: kpi, window: 1d}}
"""


def feed(service: ServiceProcess, auth: LocalAuth, key: str, units: range, seed: int) -> dict[str, list[float]]:
    """Assign `units` through the service, expose each to its arm and send seeded outcomes (treatment more
    accurate); each arm's accuracy values as sent."""
    rng = random.Random(seed)
    accuracy: dict[str, list[float]] = {"control": [], "treatment": []}
    with auth.admin.channel(service.address) as channel:
        stub = spb_grpc.ExperimentServiceStub(channel)
        metadata = auth.admin.metadata()
        wanted = [apb.AssignmentUnit(unit_ids={"user_id": f"u{u}"}) for u in units]
        assigned = stub.Assign(spb.AssignRequest(units=wanted, experiment_keys=[key]), metadata=metadata, timeout=30)
        exposures, outcomes = [], []
        for u, unit in zip(units, assigned.units, strict=True):
            (a,) = unit.assignments
            arm, uid = a.arm_name, f"u{u}"
            exposures.append(
                apb.Exposure(
                    exposure_id=exposure_id(key, a.phase, "user_id", uid, arm),
                    experiment_key=key,
                    phase=a.phase,
                    unit_type="user_id",
                    unit_id=uid,
                    arm_name=arm,
                    allocation=a.allocation,
                )
            )
            correct = 1.0 if rng.random() < (0.55 if arm == "control" else 0.75) else 0.0
            accuracy[arm].append(correct)
            # The unit's KPI before exposure predicts it after (CUPED's covariate); the treatment adds 20%.
            before = rng.gauss(100.0, 20.0)
            kpi = before * (1.2 if arm == "treatment" else 1.0) + rng.gauss(0.0, 5.0)
            covariate = apb.Outcome(
                outcome_id=f"kpi-before-{uid}",
                experiment_key=key,
                unit_type="user_id",
                unit_id=uid,
                event="kpi",
                value=before,
                kind=apb.OUTCOME_KIND_COVARIATE,
            )
            covariate.occurred_at.FromDatetime(datetime.now(UTC) - timedelta(hours=1))
            outcomes.append(covariate)
            for event, value in (("accuracy", correct), ("latency_ms", rng.gauss(40.0, 4.0)), ("kpi", kpi)):
                outcomes.append(
                    apb.Outcome(
                        outcome_id=f"{event}-{uid}",
                        experiment_key=key,
                        unit_type="user_id",
                        unit_id=uid,
                        event=event,
                        value=value,
                    )
                )
        logged = stub.LogExposures(spb.LogExposuresRequest(exposures=exposures), metadata=metadata, timeout=30)
        assert (logged.accepted, list(logged.rejections)) == (len(exposures), [])
        batch = spb.LogOutcomesRequest(batch_id=f"batch-{seed}", outcomes=outcomes)
        (ack,) = list(stub.LogOutcomes(iter([batch]), metadata=metadata, timeout=30))
        assert (ack.batch_id, ack.accepted, list(ack.rejections)) == (batch.batch_id, len(outcomes), [])
    return accuracy


def test_results_plot_and_a_decision(service: ServiceProcess, auth: LocalAuth, tmp_path: Path) -> None:
    key = "cli-results"
    path = tmp_path / "results.yaml"
    path.write_text(RESULTS_FILE)
    ok(fresco(service, auth, "create", str(path), "--start"))
    first = feed(service, auth, key, range(0, 400), seed=1)
    shown = ok(fresco(service, auth, "results", key))
    units = {arm: len(values) for arm, values in first.items()}
    assert re.search(rf"│ control \(control\)\s+│ v1\s+│\s+{units['control']:,} │\s+50\.00% │", shown), shown

    second = feed(service, auth, key, range(400, 1000), seed=2)
    accuracy = {arm: first[arm] + second[arm] for arm in first}
    plot = tmp_path / "lift.png"
    shown = ok(fresco(service, auth, "results", key, "--plot", str(plot)))
    units = {arm: len(values) for arm, values in accuracy.items()}
    assert re.search(rf"│ treatment\s+│ v2\s+│\s+{units['treatment']:,} │\s+50\.00% │", shown), shown
    assert "accuracy (success, proportion, higher is better)" in shown
    assert "latency_ms (latency, mean, lower is better)" in shown
    rates = {arm: sum(values) / len(values) for arm, values in accuracy.items()}
    lift = rates["treatment"] / rates["control"] - 1
    table = shown[shown.index("accuracy (success") : shown.index("latency_ms (latency")]
    treatment = next(line for line in table.splitlines() if line.startswith("│ treatment"))
    assert f"{lift * 100:+.2f}%" in treatment
    assert f"{rates['treatment']:.4g}" in treatment
    kpi = shown[shown.index("kpi (success") :]
    treated = next(line for line in kpi.splitlines() if line.startswith("│ treatment"))
    assert re.search(r"CUPED: variance -\d+\.\d%", treated), treated
    assert f"{units['treatment']:,}/{units['treatment']:,} units with prior data" in treated
    assert "sample ratio: ok" in flat(shown)
    assert "decision:" in shown
    assert re.search(r"│ treatment\s+│ min_lift accuracy >= \+2\.00%\s+│ [+-][\d.]+% │\s+\+2\.00% │ (pass|FAIL)", shown)
    assert re.search(r"│ treatment\s+│ max_regression latency_ms <= 10\.00%", shown)
    # Three snapshots (one per GetResults) make the history: a valid PNG with the treatment's line and band.
    plotted = flat(shown.splitlines()[-1])
    assert re.fullmatch(rf"plotted accuracy for 1 treatment arm\(s\), (\d+) points: {re.escape(str(plot))}", plotted)
    assert int(plotted.split(", ")[1].split()[0]) >= 2
    data = plot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000

    # The recommendation ships the treatment, which needs the model manager this service was not given.
    assert "decision: SHIP_TREATMENT treatment" in shown
    recommended = fresco(service, auth, "decide", key)
    assert recommended.returncode == 1
    assert flat(recommended.stderr).startswith("decide failed: FAILED_PRECONDITION:")
    assert "--model-manager-address" in recommended.stderr
    decided = ok(fresco(service, auth, "decide", key, "--action", "keep", "--reason", "the team keeps v1 for now"))
    assert f"{key} DECIDED: KEEP_CONTROL" in flat(decided)
    assert "the team keeps v1 for now" in flat(decided)
    shown = flat(ok(fresco(service, auth, "show", key)))
    assert "status DECIDED" in shown
    assert "decision KEEP_CONTROL" in shown
    late = fresco(service, auth, "decide", key, "--action", "keep", "--reason", "again")
    assert late.returncode == 1
    assert flat(late.stderr).startswith("decide failed: FAILED_PRECONDITION:")
