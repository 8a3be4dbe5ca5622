"""The model store over a real repository: loading, versions, failures, unloading, inference."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from chassis.errors import InvalidArgument, NotFound, Unavailable
from fresco.training import ExportedModel
from predictor.models import ModelStore, State
from predictor.repository import ModelRepository


def _store(root: Path, executor: ThreadPoolExecutor) -> ModelStore:
    return ModelStore(ModelRepository(root), executor)


def _add_version(root: Path, model: str, version: int, source: Path) -> None:
    shutil.copytree(source, root / model / str(version))


def _update_config(root: Path, model: str, **changes: object) -> None:
    path = root / model / "config.yaml"
    config = yaml.safe_load(path.read_text()) if path.exists() else {}
    path.write_text(yaml.safe_dump({**config, **changes}))


async def test_load_makes_the_model_ready(repository: Path, executor: ThreadPoolExecutor) -> None:
    store = _store(repository, executor)
    model = await store.load("demo")
    assert model.state is State.READY
    assert model.reason == ""
    assert sorted(model.versions) == [1]
    version = store.get("demo")
    assert version is model.versions[1]
    assert store.get("demo", "1") is version
    assert version.state is State.READY
    assert version.session is not None
    assert version.load_seconds > 0
    (x,) = version.inputs
    assert (x.name, x.datatype, x.shape) == ("X", "FP32", (-1, 8))
    assert x.features == tuple(f"f{i}" for i in range(8))
    outputs = {spec.name: (spec.datatype, spec.shape) for spec in version.outputs}
    assert outputs == {"label": ("INT64", (-1,)), "probabilities": ("FP32", (-1, 2))}
    await store.close()
    assert store.models == {}
    assert version.session is None


async def test_two_versions_side_by_side(repository: Path, executor: ThreadPoolExecutor) -> None:
    _add_version(repository, "demo", 2, repository / "demo" / "1")
    _update_config(repository, "demo", version_policy={"all": True})
    store = _store(repository, executor)
    model = await store.load("demo")
    assert model.state is State.READY
    assert sorted(model.versions) == [1, 2]
    assert all(v.state is State.READY for v in model.versions.values())
    assert store.get("demo").version == 2  # the newest is the default
    assert store.get("demo", "1").version == 1
    assert store.get("demo", "2").version == 2
    with pytest.raises(
        NotFound, match=r"^Request for unknown model: 'demo' version 3 is not found; .* it serves \[1, 2\]"
    ):
        store.get("demo", "3")
    await store.close()


async def test_configured_default_version_wins(repository: Path, executor: ThreadPoolExecutor) -> None:
    _add_version(repository, "demo", 2, repository / "demo" / "1")
    _update_config(repository, "demo", version_policy={"all": True}, default_version=1)
    store = _store(repository, executor)
    await store.load("demo")
    assert store.get("demo").version == 1
    assert store.get("demo", "").version == 1
    await store.close()


async def test_default_policy_serves_only_the_latest(repository: Path, executor: ThreadPoolExecutor) -> None:
    _add_version(repository, "demo", 3, repository / "demo" / "1")
    store = _store(repository, executor)
    model = await store.load("demo")
    assert sorted(model.versions) == [3]
    with pytest.raises(NotFound, match="has no version 1"):
        store.get("demo", "1")
    await store.close()


@pytest.mark.parametrize(
    "version",
    ["abc", "-1", "1.0", " 1", "²", "9" * 5000],
    ids=["letters", "negative", "decimal", "space", "superscript-two", "5000-digits"],
)
async def test_malformed_version_is_invalid_argument(
    repository: Path, executor: ThreadPoolExecutor, version: str
) -> None:
    """model_version comes straight from the request. "²" passes str.isdigit() but int() refuses it,
    and so does a digit string longer than Python's 4300-digit limit: both escape as ValueError."""
    store = _store(repository, executor)
    await store.load("demo")
    try:
        expected = f"failed to get model version from specified version string '{re.escape(version)}'"
        with pytest.raises(InvalidArgument, match=f"^{expected}: model_version must be an integral value > 0"):
            store.get("demo", version)
    finally:
        await store.close()


async def test_unknown_model(repository: Path, executor: ThreadPoolExecutor) -> None:
    store = _store(repository, executor)
    with pytest.raises(NotFound, match="model 'nope' is not in the repository"):
        await store.load("nope")
    # Triton's wording first, which its clients match on, then the detail.
    with pytest.raises(
        NotFound,
        match=r"^Request for unknown model: 'nope' is not found; model 'nope' is not loaded; loaded models: \[\]",
    ):
        store.get("nope")
    with pytest.raises(NotFound, match=r"^Request for unknown model: 'nope' is not found; model 'nope' is not loaded"):
        await store.unload("nope")
    with pytest.raises(InvalidArgument, match=r"model name '\.\./demo'"):
        await store.load("../demo")


async def test_corrupt_model_is_unavailable_while_others_stay_ready(
    repository: Path, executor: ThreadPoolExecutor
) -> None:
    broken = repository / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(os.urandom(4096))
    (repository / "hollow" / "1").mkdir(parents=True)  # a version directory without its model file
    (repository / "badconfig" / "1").mkdir(parents=True)
    (repository / "badconfig" / "config.yaml").write_text("inputs: {oops\n")
    (repository / "empty").mkdir()  # no version directory at all
    store = _store(repository, executor)
    await store.load_all()
    assert sorted(store.models) == ["badconfig", "broken", "demo", "empty", "hollow"]
    assert store.models["demo"].state is State.READY
    assert store.get("demo").state is State.READY

    model = store.models["broken"]
    assert model.state is State.UNAVAILABLE
    assert model.reason.startswith("version 1: model file could not be loaded by ONNX Runtime")
    version = model.versions[1]
    assert version.state is State.UNAVAILABLE
    assert version.session is None
    assert "ONNX Runtime" in version.reason
    with pytest.raises(Unavailable, match=r"model 'broken' has no READY version \(UNAVAILABLE: version 1: model"):
        store.get("broken")
    assert store.get("broken", "1") is version
    with pytest.raises(Unavailable, match="model 'broken' version 1 is UNAVAILABLE"):
        _ = version.inputs
    with pytest.raises(Unavailable, match="not READY"):
        async with version.use():
            pass

    assert store.models["hollow"].state is State.UNAVAILABLE
    assert "model file missing" in store.models["hollow"].reason
    assert "model.onnx" in store.models["hollow"].reason
    assert store.models["badconfig"].state is State.UNAVAILABLE
    assert "config.yaml: not valid YAML" in store.models["badconfig"].reason
    assert store.models["empty"].state is State.UNAVAILABLE
    assert "no version directory matches its version policy" in store.models["empty"].reason
    await store.close()


async def test_config_naming_a_tensor_the_model_lacks_is_unavailable(
    repository: Path, executor: ThreadPoolExecutor
) -> None:
    _update_config(repository, "demo", outputs=[{"name": "logits", "datatype": "FP32", "shape": [-1, 2]}])
    store = _store(repository, executor)
    model = await store.load("demo")
    assert model.state is State.UNAVAILABLE
    assert "config.yaml output 'logits' is not in the model" in model.reason
    await store.close()


async def test_unload_waits_for_an_in_flight_request(repository: Path, executor: ThreadPoolExecutor) -> None:
    store = _store(repository, executor)
    await store.load("demo")
    version = store.get("demo")
    holding, release = asyncio.Event(), asyncio.Event()

    async def request() -> None:
        async with version.use():
            holding.set()
            await release.wait()

    in_flight = asyncio.create_task(request())
    await asyncio.wait_for(holding.wait(), 5)
    assert version.in_flight == 1
    unloading = asyncio.create_task(store.unload("demo"))
    await asyncio.sleep(0.05)
    assert not unloading.done()
    assert "demo" not in store.models  # no new request is routed to it
    assert version.state is State.UNLOADING
    assert version.session is not None  # the running request still has its session
    with pytest.raises(NotFound):
        store.get("demo")
    with pytest.raises(Unavailable, match="UNLOADING"):
        async with version.use():
            pass
    release.set()
    await asyncio.wait_for(unloading, 5)
    await in_flight
    assert version.in_flight == 0
    assert version.session is None


async def test_reload_replaces_versions_after_draining_the_old_ones(
    repository: Path, executor: ThreadPoolExecutor
) -> None:
    store = _store(repository, executor)
    first = await store.load("demo")
    old = first.versions[1]
    second = await store.load("demo")
    assert second is not first
    assert store.get("demo") is second.versions[1]
    assert store.get("demo").state is State.READY
    assert old.state is State.UNLOADING
    assert old.session is None
    await store.close()


async def test_infer_equals_onnxruntime_run_directly(
    repository: Path, executor: ThreadPoolExecutor, trained_model: ExportedModel
) -> None:
    store = _store(repository, executor)
    await store.load("demo")
    version = store.get("demo")
    sample = trained_model.sample[:32]
    direct = ort.InferenceSession(trained_model.path.read_bytes(), providers=["CPUExecutionProvider"])
    label, probabilities = direct.run(["label", "probabilities"], {"X": sample})

    results = await store.infer(version, {"X": sample}, [])
    assert set(results) == {"label", "probabilities"}
    np.testing.assert_array_equal(results["label"], label)
    np.testing.assert_allclose(results["probabilities"], probabilities, rtol=1e-6, atol=1e-7)
    assert results["label"].dtype == np.int64
    assert results["probabilities"].shape == (32, 2)
    assert set(np.unique(label)) <= {0, 1}
    assert len(set(label.tolist())) == 2  # a trained model, not a constant

    only = await store.infer(version, {"X": sample[:3]}, ["probabilities"])
    assert list(only) == ["probabilities"]
    np.testing.assert_allclose(only["probabilities"], probabilities[:3], rtol=1e-6, atol=1e-7)
    assert version.stats.execution_count == 2
    assert version.stats.inference_count == 35
    assert version.in_flight == 0
    await store.close()


async def test_repository_calls_for_made_up_names_leave_nothing_behind(
    repository: Path, executor: ThreadPoolExecutor
) -> None:
    """Unloading or loading names that were never models leaves no lock, model or version behind
    (each used to leave a lock in a dict that only grew)."""
    store = _store(repository, executor)
    try:
        await store.load("demo")
        for i in range(200):
            with pytest.raises(NotFound):
                await store.unload(f"made-up-{i}")
            with pytest.raises(NotFound):
                await store.load(f"made-up-{i}")
        with pytest.raises(InvalidArgument):
            await store.load("../escape")
        assert len(store.locks) == 0
        assert sorted(store.models) == ["demo"]
        # A real model's lock goes too once its calls are done.
        await store.unload("demo")
        assert len(store.locks) == 0
        assert store.models == {}
    finally:
        await store.close()
