"""Fixtures of the model manager's tests: two real gRPC servers standing for two versions of a model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fresco.suite import ServiceProcess
from model_manager.routes import Endpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def version_servers() -> Iterator[dict[str, Endpoint]]:
    """`v1` and `v2`: one real server process each, answering with its label; their endpoints."""
    started: list[ServiceProcess] = []
    endpoints: dict[str, Endpoint] = {}
    try:
        for label in ("v1", "v2"):
            process = ServiceProcess("tests.model_manager.version_server", [label], env={"PYTHONPATH": str(ROOT)})
            started.append(process)
            process.start()
            process.wait_healthy()
            endpoints[label] = Endpoint.parse(process.address)
        yield endpoints
    finally:
        for process in started:
            process.stop()
