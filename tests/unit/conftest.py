"""Shared fixtures of the unit tests: one real model trained per session, and a thread pool."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fresco.training import ExportedModel, train_classifier


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> ExportedModel:
    """A real sklearn MLP exported to ONNX, trained once per session (input "X" FP32 [-1, 8])."""
    return train_classifier(tmp_path_factory.mktemp("trained"), name="demo", version=1)


@pytest.fixture
def repository(tmp_path: Path, trained_model: ExportedModel) -> Path:
    """A fresh repository holding a copy of the trained model as `demo` version 1."""
    root = tmp_path / "models"
    shutil.copytree(trained_model.path.parent.parent, root / "demo")
    return root


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(2, thread_name_prefix="test-infer")
    yield pool
    pool.shutdown(wait=True)
