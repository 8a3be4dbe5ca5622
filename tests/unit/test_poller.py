"""Polling the model repository with a real model store: a new model directory loads, a new version
reloads, a removed directory unloads, and a broken change keeps the old version serving."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

from chassis.errors import NotFound
from predictor.models import ModelStore, State
from predictor.poller import RepositoryPoller
from predictor.repository import ModelRepository

ROWS = np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8)


@pytest.fixture
async def store(repository: Path, executor: ThreadPoolExecutor) -> AsyncIterator[ModelStore]:
    """A store that loaded the repository (demo version 1), as poll mode starts."""
    models = ModelStore(ModelRepository(repository), executor)
    await models.load_all()
    yield models
    await models.close()


@pytest.fixture
def poller(store: ModelStore) -> RepositoryPoller:
    watcher = RepositoryPoller(store, interval_s=60)
    watcher.remember()
    return watcher


async def answers(store: ModelStore, name: str, version: str = "") -> dict[str, np.ndarray]:
    return await store.infer(store.get(name, version), {"X": ROWS}, [])


async def test_nothing_changed_nothing_done(store: ModelStore, poller: RepositoryPoller) -> None:
    version = store.get("demo")
    assert await poller.scan() == []
    assert store.get("demo") is version


async def test_a_new_model_directory_loads(repository: Path, store: ModelStore, poller: RepositoryPoller) -> None:
    expected = await answers(store, "demo")
    shutil.copytree(repository / "demo", repository / "second")
    assert await poller.scan() == ["second"]
    assert store.model("second").state is State.READY
    got = await answers(store, "second")
    np.testing.assert_array_equal(got["label"], expected["label"])
    assert await poller.scan() == []


async def test_a_new_version_reloads_and_serves(repository: Path, store: ModelStore, poller: RepositoryPoller) -> None:
    old = store.get("demo")
    shutil.copytree(repository / "demo" / "1", repository / "demo" / "2")
    assert await poller.scan() == ["demo"]
    assert store.get("demo").version == 2  # version_policy latest 1
    assert sorted(store.model("demo").versions) == [2]
    with pytest.raises(NotFound, match="has no version 1"):
        store.get("demo", "1")
    assert old.state is State.UNLOADING
    assert old.session is None
    assert (await answers(store, "demo", "2"))["label"].shape == (2,)


async def test_a_removed_model_directory_unloads(repository: Path, store: ModelStore, poller: RepositoryPoller) -> None:
    shutil.copytree(repository / "demo", repository / "second")
    await poller.scan()
    assert store.model("second").state is State.READY
    shutil.rmtree(repository / "second")
    assert await poller.scan() == ["second"]
    with pytest.raises(NotFound, match="'second' is not loaded"):
        store.get("second")
    assert store.get("demo").state is State.READY


async def test_a_broken_new_config_keeps_the_old_version_serving(
    repository: Path, store: ModelStore, poller: RepositoryPoller
) -> None:
    version = store.get("demo")
    config = repository / "demo" / "config.yaml"
    good = config.read_text()
    config.write_text(yaml.safe_dump({**yaml.safe_load(good), "batching": {"max_batch_size": 0}}))
    assert await poller.scan() == ["demo"]
    assert store.get("demo") is version
    assert version.state is State.READY
    model = store.model("demo")
    assert "reload failed, previous versions still serving" in model.reason
    assert "batching.max_batch_size" in model.reason
    assert (await answers(store, "demo"))["label"].shape == (2,)

    config.write_text(good + "\n")  # fixed: the next scan reloads
    assert await poller.scan() == ["demo"]
    assert store.get("demo") is not version
    assert store.model("demo").state is State.READY
    assert store.model("demo").reason == ""


async def test_run_scans_on_its_interval(repository: Path, store: ModelStore) -> None:
    poller = RepositoryPoller(store, interval_s=0.02)
    poller.remember()
    task = asyncio.ensure_future(poller.run())
    try:
        shutil.copytree(repository / "demo", repository / "second")
        for _ in range(500):
            if "second" in store.models and store.model("second").state is State.READY:
                break
            await asyncio.sleep(0.01)
        assert store.model("second").state is State.READY
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
