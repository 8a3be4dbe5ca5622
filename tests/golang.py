"""The Go toolchain for tests that build or run Go code (the Go client, the manifests' validator).

`make test` checks for Go 1.24+ before pytest starts (scripts/ensure-test-deps); a test that needs it
fails, never skips, when it is missing. Module downloads and builds are cached in Go's usual places
(~/go/pkg/mod, ~/.cache/go-build), so only the first run on a machine pays for them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

INSTALLED_AT = Path("/usr/local/go/bin/go")  # where go.dev's installer puts it


def go_binary() -> str:
    found = shutil.which("go") or (str(INSTALLED_AT) if INSTALLED_AT.exists() else None)
    if found is None:
        pytest.fail("these tests need Go 1.24 or later on PATH: install it from https://go.dev/dl")
    return found


def run_go(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout_s: float = 900) -> str:
    """Run `go ARGS` in `cwd`; its combined output, or a test failure that shows it."""
    completed = subprocess.run(
        [go_binary(), *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    output = completed.stdout + completed.stderr
    if completed.returncode != 0:
        pytest.fail(f"go {' '.join(args)} exited {completed.returncode}:\n{output}")
    return output
