"""`fresco models`, `fresco audit` and `fresco apply|diff` (checks and plans, before the deployment RPCs) end to end
against a running model manager."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from chassis.auth import Role, token_line
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.cli_apply import plan, register_versions
from fresco.cli_manager import connect
from fresco.deployments_file import load
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


def cli(service: ServiceProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """`fresco ARGS` against the service, wide enough that rich wraps no line."""
    env = {**os.environ, "COLUMNS": "400", "FRESCO_MODEL_MANAGER": service.address}
    command = [sys.executable, "-m", "fresco.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, check=False)


def audit_rows(service: ServiceProcess, model: str) -> list[str]:
    shown = cli(service, "audit", "--model", model)
    assert shown.returncode == 0, shown.stderr
    return [line for line in shown.stdout.splitlines() if f"│ {model} " in line]


def test_audit_shows_who_did_what_newest_first_and_pages(service: ServiceProcess, tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"audited bytes")
    for reason in ("first", "second"):
        registered = fresco(service, "register", "--name", "audited", "--version-file", str(model), "--reason", reason)
        assert registered.returncode == 0, registered.stderr
    assert fresco(service, "alias", "audited", "champion", "2", "--reason", "best").returncode == 0

    rows = audit_rows(service, "audited")
    actions = [next(a for a in ("alias.set", "version.register", "model.create") if a in row) for row in rows]
    assert actions == ["alias.set", "version.register", "version.register", "model.create"]
    assert all("│ anonymous " in row for row in rows)  # the identity the server saw, not a name the client sent
    reasons = [reason for row, reason in zip(rows, ("best", "second", "first"), strict=False) if f"│ {reason} " in row]
    assert reasons == ["best", "second", "first"]
    ids = [int(row.split("│")[1]) for row in rows]
    assert ids == sorted(ids, reverse=True)

    limited = cli(service, "audit", "--model", "audited", "--limit", "3")
    assert limited.returncode == 0, limited.stderr
    assert [line for line in limited.stdout.splitlines() if "│ audited " in line] == rows[:3]
    everything = cli(service, "audit", "--limit", "1000")
    assert sum("│ audited " in line for line in everything.stdout.splitlines()) == 4


DEPLOYMENTS = """
reason: first deployment
models:
  - name: {name}
    owner: risk
    versions:
      - version: 1
        artifact: model.onnx
        metrics: {{auc: 0.9}}
    aliases: {{champion: 1}}
    serve: 1
    strategy:
      canary:
        steps: [{{weight: 10, dwell: 30s}}]
        analysis: {{max_error_rate: 0.05}}
"""


def test_diff_shows_the_plan_and_changes_nothing(service: ServiceProcess, tmp_path: Path) -> None:
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(b"planned bytes" * 100)
    digest = hashlib.sha256(artifact.read_bytes()).hexdigest()
    (tmp_path / "deployments.yaml").write_text(DEPLOYMENTS.format(name="planned"))
    shown = cli(service, "diff", "-f", str(tmp_path / "deployments.yaml"))
    assert shown.returncode == 0, shown.stderr
    assert [line.rstrip() for line in shown.stdout.splitlines()] == [
        "planned:",
        "  + create model planned (owner risk)",
        f"  + register version 1 from {artifact} (sha256 {digest[:12]}…, 1300 bytes)",
        "  + deployment serving v1 with canary 10% → 100%; the server checks it once the model and version(s) 1 "
        "are registered",
    ]
    missing = fresco(service, "show", "planned")
    assert missing.returncode == 1
    assert "NOT_FOUND" in missing.stderr
    assert audit_rows(service, "planned") == []


def test_apply_rejects_a_misspelled_field_before_any_call(service: ServiceProcess, tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"never uploaded")
    bad = DEPLOYMENTS.format(name="misspelled").replace("{weight: 10,", "{wieght: 10,")
    (tmp_path / "deployments.yaml").write_text(bad)
    for command in ("apply", "diff"):
        refused = cli(service, command, "-f", str(tmp_path / "deployments.yaml"))
        assert refused.returncode == 2
        assert "is not a valid deployments file:" in refused.stderr
        assert "models[0].strategy.canary.steps[0].wieght: unknown field (did you mean weight?)" in refused.stderr
    assert fresco(service, "show", "misspelled").returncode == 1  # the model was not created
    assert audit_rows(service, "misspelled") == []


def test_a_new_artifact_under_a_registered_number_stops_apply_with_nothing_changed(
    service: ServiceProcess, tmp_path: Path
) -> None:
    first = tmp_path / "first.onnx"
    first.write_bytes(b"version one")
    assert fresco(service, "register", "--name", "immutable", "--version-file", str(first)).returncode == 0
    before = audit_rows(service, "immutable")
    (tmp_path / "model.onnx").write_bytes(b"different bytes")
    (tmp_path / "deployments.yaml").write_text(DEPLOYMENTS.format(name="immutable"))
    for command in ("apply", "diff"):
        refused = cli(service, command, "-f", str(tmp_path / "deployments.yaml"))
        assert refused.returncode == 1
        stderr = " ".join(refused.stderr.split())
        assert "nothing applied:" in stderr
        assert "models[0].versions[0]: version 1 of immutable is registered with sha256" in stderr
        assert "versions are immutable" in stderr
    assert audit_rows(service, "immutable") == before


def test_a_forced_promotion_needs_a_reason(service: ServiceProcess) -> None:
    refused = fresco(service, "promote", "churn", "1", "--to", "production", "--force")
    assert refused.returncode == 2
    assert "--force needs a --reason" in " ".join(refused.stderr.split())


def test_with_auth_on_the_cli_sends_the_token_and_the_audit_names_its_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = {"dana": (Role.DEPLOYER, "dana-deployer-token"), "vik": (Role.VIEWER, "vik-viewer-token")}
    (tmp_path / "tokens").write_text("".join(token_line(n, role, t) + "\n" for n, (role, t) in tokens.items()))
    for name, (_, token) in tokens.items():
        (tmp_path / f"{name}.token").write_text(token + "\n")
    model = tmp_path / "model.onnx"
    model.write_bytes(b"guarded bytes")
    args = ["--data-dir", str(tmp_path / "data"), "--port", "0", "--metrics-port", "-1"]
    auth = ["--auth-tokens-file", str(tmp_path / "tokens"), "--auth-require-for-reads"]
    process = ServiceProcess("model_manager", [*args, *auth]).start()
    try:
        process.wait_healthy(60)
        unread = cli(process, "audit")
        assert unread.returncode == 1
        assert "audit failed: UNAUTHENTICATED" in unread.stderr
        register = ("models", "register", "--name", "guarded", "--version-file", str(model))
        missing = cli(process, *register)
        assert missing.returncode == 1
        assert "register failed: UNAUTHENTICATED" in missing.stderr
        viewer = cli(process, *register, "--token-file", str(tmp_path / "vik.token"))
        assert viewer.returncode == 1
        assert "register failed: PERMISSION_DENIED" in viewer.stderr
        done = cli(process, *register, "--token-file", str(tmp_path / "dana.token"))
        assert done.returncode == 0, done.stderr
        monkeypatch.setenv("FRESCO_TOKEN_FILE", str(tmp_path / "vik.token"))  # the environment's token, for a read
        rows = audit_rows(process, "guarded")
    finally:
        assert process.stop() == 0
    assert len(rows) == 2
    assert all("│ dana " in row for row in rows)  # model.create and version.register, by the token's holder


def test_apply_registers_what_is_missing_once(service: ServiceProcess, tmp_path: Path) -> None:
    """The registry half of `fresco apply` (the deployment half needs ApplyDeployment): the model is created and
    each version uploaded the first time; planned again, everything matches and nothing is uploaded."""
    (tmp_path / "v1.onnx").write_bytes(b"first artifact")
    (tmp_path / "v2.onnx").write_bytes(b"second artifact")
    (tmp_path / "deployments.yaml").write_text(
        """
models:
  - name: declared
    owner: risk
    versions:
      - {version: 1, artifact: v1.onnx, metrics: {auc: 0.8}}
      - {version: 2, artifact: v2.onnx, parent_version: 1, code_commit: abc}
    serve: 2
    strategy: {blue_green: {}}
"""
    )
    declared = load(tmp_path / "deployments.yaml").models[0]
    with connect(service.address, None, "apply") as manager:
        first = plan(manager, 0, declared)
        assert (first.exists, [u.declaration.version for u in first.uploads], first.problems) == (False, [1, 2], [])
        register_versions(manager, first, "declared in a file")
        again = plan(manager, 0, declared)
        assert (again.exists, again.uploads, again.problems) == (True, [], [])
        second = manager.stub.GetModelVersion(pb.GetModelVersionRequest(model_name="declared", version=2)).model_version
        model = manager.stub.GetModel(pb.GetModelRequest(name="declared")).model
    assert second.sha256 == hashlib.sha256(b"second artifact").hexdigest()
    assert (second.lineage.parent_version, second.lineage.code_commit) == (1, "abc")
    assert (model.owner, model.latest_version) == ("risk", 2)
    rows = audit_rows(service, "declared")
    assert len(rows) == 3
    assert all("│ declared in a file " in row for row in rows)


def test_update_changes_only_the_fields_given_and_names_a_bad_one(service: ServiceProcess, tmp_path: Path) -> None:
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(b"a model to update")
    for _ in range(2):
        registered = fresco(service, "register", "--name", "tuned", "--version-file", str(artifact), "--owner", "risk")
        assert registered.returncode == 0, registered.stderr
    updated = fresco(
        service,
        "update", "tuned",
        "--description", "churn scorer",
        "--label", "team=risk", "--label", "tier=gold",
        "--fallback-version", "2",
        "--static-answer", "probability=[0.5, 0.5]",
        "--static-answer", "label=low",
        "--static-answer", "count=3",
        "--reason", "a safety net",
    )  # fmt: skip
    assert updated.returncode == 0, updated.stderr
    shown = " ".join(updated.stdout.split())
    assert "updated tuned: description, labels, fallback_version, static_fallback" in shown
    assert "fallback version 2" in shown
    assert 'static answer count=3, label="low", probability=[0.5, 0.5]' in shown
    with connect(service.address, None, "update") as manager:
        model = manager.stub.GetModel(pb.GetModelRequest(name="tuned")).model
    assert (model.description, model.owner, dict(model.labels)) == (
        "churn scorer",
        "risk",
        {"team": "risk", "tier": "gold"},
    ), "the owner was not named in the update mask, so it stays"
    assert model.fallback_version == 2
    outputs = model.static_fallback.outputs
    assert list(outputs["probability"].double_list.values) == [0.5, 0.5]
    assert (outputs["label"].string_value, outputs["count"].int64_value) == ("low", 3)
    assert any("model.update" in row and "a safety net" in row for row in audit_rows(service, "tuned"))

    refusals = {
        ("--fallback-version", "9"): (1, "update failed: NOT_FOUND: model.fallback_version"),
        (): (2, "nothing to update"),
        ("--static-answer", "probability"): (2, "expected KEY=VALUE"),
        ("--static-answer", "probability=null"): (2, "expected a number"),
        ("--static-answer", 'x=[1, "a"]'): (2, "expected a number"),
        ("--static-answer", "x=1", "--clear-static-answer"): (2, "not both"),
        ("--label", "Bad Key=1"): (1, "update failed: INVALID_ARGUMENT: model.labels"),
    }
    for args, (code, said) in refusals.items():
        refused = fresco(service, "update", "tuned", *args)
        assert refused.returncode == code, (args, refused.stderr)
        assert said in " ".join(refused.stderr.split()), (args, refused.stderr)

    cleared = fresco(service, "update", "tuned", "--clear-static-answer", "--fallback-version", "0")
    assert cleared.returncode == 0, cleared.stderr
    with connect(service.address, None, "update") as manager:
        model = manager.stub.GetModel(pb.GetModelRequest(name="tuned")).model
    assert (model.fallback_version, len(model.static_fallback.outputs)) == (0, 0)
    assert (model.description, dict(model.labels)) == ("churn scorer", {"team": "risk", "tier": "gold"})
