"""The validator, built once per session, and the services' settings it checks variables against."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.deploy.rendering import SETTINGS, VALIDATOR
from tests.golang import go_binary, run_go


@pytest.fixture(scope="session")
def validator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    binary = tmp_path_factory.mktemp("validate") / "validate"
    unformatted = subprocess.run(
        [str(Path(go_binary()).parent / "gofmt"), "-l", "."], cwd=VALIDATOR, capture_output=True, text=True, check=True
    ).stdout
    assert not unformatted, f"not gofmt'd: {unformatted}"
    run_go(["vet", "./..."], cwd=VALIDATOR)
    run_go(["build", "-o", str(binary), "."], cwd=VALIDATOR)
    return binary


@pytest.fixture(scope="session")
def settings_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each service's FRESCO_* variables, from its settings class (what the manifests may set)."""
    known = {
        component: [f"{cls.model_config['env_prefix']}{name.upper()}" for name in cls.model_fields]
        for component, cls in SETTINGS.items()
    }
    path = tmp_path_factory.mktemp("settings") / "settings.json"
    path.write_text(json.dumps(known))
    return path
