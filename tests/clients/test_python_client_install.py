"""The light Python client: `pip install <repo>` without extras into a clean virtualenv brings grpcio, protobuf
and numpy and none of the servers' dependencies; in that virtualenv a calling service predicts through a real
gateway and predictor (answers equal to ONNX Runtime's, bit for bit), and the experiment hash reproduces the
committed vectors. The `fresco` command there says which extra to install instead of failing with a traceback.

pip installs from the network or its cache as the machine allows, pinned by constraints.txt, while the services
start and the model trains."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fresco.suite import Suite, issue_local_tokens, start_suite
from fresco.training import train_classifier
from tests.integration import Reference

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RUN = Path(__file__).with_name("light_client_run.py")
# Distributions the client may bring: itself, its three dependencies and theirs, and the venv's own tools.
ALLOWED = {"fresco", "grpcio", "protobuf", "numpy", "typing-extensions", "pip", "setuptools"}
# A few of the servers' dependencies, named by the issue, that must not come with the client.
SERVER_ONLY = {"onnxruntime", "cassandra-driver", "redis", "pyarrow", "scikit-learn", "typer", "pydantic", "scipy"}
# Auth on, and the gateway's Predict needs a token too (reads are open by default).
READS_NEED_A_TOKEN = {"FRESCO_GATEWAY_AUTH_REQUIRE_FOR_READS": "true"}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@dataclass(frozen=True)
class LightInstall:
    """A virtualenv holding the client alone, and what pip installed there."""

    python: Path
    distributions: set[str]


def _checkout_copy(destination: Path) -> Path:
    """The repository's tracked and new (not ignored) files, so that no local build output or virtualenv is
    installed with them."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def _run(
    command: list[str], cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=300)
    assert completed.returncode == 0, f"{command} exited {completed.returncode}:\n{completed.stdout}{completed.stderr}"
    return completed


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LightInstall, Suite, Reference, str]]:
    root = tmp_path_factory.mktemp("light-client")
    source = _checkout_copy(root / "source")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    # Without the caller's virtualenv in the environment, so pip sees only the new one.
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    pip = subprocess.Popen(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "-c", str(REPO / "constraints.txt"), str(source)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        model = train_classifier(root / "models", "demo", 1)
        auth = issue_local_tokens(root / "auth")
        suite = start_suite(root / "models", env=READS_NEED_A_TOKEN, log_dir=root, auth=auth)
    except BaseException:
        pip.kill()
        raise
    try:
        output, _ = pip.communicate(timeout=300)
        assert pip.returncode == 0, f"pip install of the client failed:\n{output}"
        listed = _run([str(python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"], env=env)
        names = {entry["name"].lower().replace("_", "-") for entry in json.loads(listed.stdout)}
        yield LightInstall(python, names), suite, Reference(model), auth.admin_token_file.read_text().strip()
    finally:
        suite.stop()


def test_the_client_installs_with_grpcio_protobuf_and_numpy_only(
    world: tuple[LightInstall, Suite, Reference, str],
) -> None:
    install = world[0]
    assert {"fresco", "grpcio", "protobuf", "numpy"} <= install.distributions
    assert install.distributions & SERVER_ONLY == set()
    assert install.distributions <= ALLOWED, f"more than the client's dependencies: {install.distributions - ALLOWED}"


def test_a_calling_service_predicts_and_hashes_with_the_client_alone(
    world: tuple[LightInstall, Suite, Reference, str], tmp_path: Path
) -> None:
    install, suite, reference, token = world
    rows = reference.model.sample[:4]
    command = [str(install.python), str(RUN), suite.service("gateway").address, token, TRACEPARENT]
    # From an empty directory, so that only the installed fresco can be imported.
    report = json.loads(_run([*command, json.dumps(rows.tolist())], cwd=tmp_path).stdout)

    assert Path(report["fresco_file"]).is_relative_to(report["prefix"]), "fresco was imported from the virtualenv"
    assert report["server_modules"] == [], "the client imports nothing of the servers"
    expected = reference.predict(rows)["probabilities"].astype(np.float64)
    np.testing.assert_array_equal(np.array(report["predict"]), expected)
    np.testing.assert_array_equal(np.array(report["predict_batch"]), expected)
    np.testing.assert_array_equal(np.array(report["predict_async"]), expected[0])
    assert report["trace_id"] == TRACE_ID, "the gateway's trace joined the caller's"
    assert report["without_token"] == "UNAUTHENTICATED"
    assert report["vectors"] >= 400
    assert report["disagreements"] == []


def test_the_fresco_command_without_the_server_extra_says_what_to_install(
    world: tuple[LightInstall, Suite, Reference, str],
) -> None:
    install = world[0]
    completed = subprocess.run(
        [str(install.python.parent / "fresco"), "--help"], capture_output=True, text=True, check=False, timeout=60
    )
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    assert "server extra" in completed.stderr
    assert "pip install 'fresco[server]'" in completed.stderr
