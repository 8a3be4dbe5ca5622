"""`make test` sets itself up: scripts/ensure-test-deps runs before pytest, and where it cannot install
what is missing it stops at once with one line naming the missing thing and the command to install it."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "ensure-test-deps"


def test_make_test_runs_the_setup_before_pytest() -> None:
    planned = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lines = planned.splitlines()
    setup = next(i for i, line in enumerate(lines) if "scripts/ensure-test-deps" in line)
    tests = next(i for i, line in enumerate(lines) if line.rstrip().endswith("/pytest"))
    assert setup < tests, planned


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in ci.splitlines()[-1]
    assert "make test" in readme
    assert "make demo" in readme
    assert "install-test-deps" not in readme  # no third command before the two


@pytest.fixture
def bin_without_redis() -> Iterator[Path]:
    """A directory to use as PATH: every command of /usr/bin and /bin except redis-server, readable by anyone."""
    folder = Path(tempfile.mkdtemp(prefix="fresco-path-"))
    folder.chmod(0o755)
    for source in (Path("/usr/bin"), Path("/bin")):
        for command in source.iterdir():
            target = folder / command.name
            if command.name.startswith("redis-server") or target.exists():
                continue
            target.symlink_to(command)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_user_without_root_gets_one_line_naming_what_is_missing_and_how(bin_without_redis: Path) -> None:
    # A copy of the script, so an unprivileged user can read it wherever the checkout lives.
    work = Path(tempfile.mkdtemp(prefix="fresco-deps-"))
    try:
        work.chmod(0o755)
        (work / "scripts").mkdir(mode=0o755)
        script = work / "scripts" / SCRIPT.name
        shutil.copy(SCRIPT, script)
        script.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        command = [str(script)]
        if os.geteuid() == 0:  # drop root, as a developer's own account would run it
            command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
        env = {"PATH": str(bin_without_redis), "HOME": str(work), "FRESCO_SKIP_CASSANDRA": "1"}
        result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=30, check=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert result.returncode == 1, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("make test needs redis-server"), lines[0]
    assert "apt-get install -y redis-server" in lines[0]


def test_with_everything_present_it_is_quiet_and_quick() -> None:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is missing although make test installs it first")
    result = subprocess.run([str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
