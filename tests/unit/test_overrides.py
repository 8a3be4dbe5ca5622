"""RepositoryModelLoad's parameters: Triton's JSON `config` mapped onto config.yaml's model, and
model files sent inline, written to a private directory and never outside it."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from chassis.errors import InvalidArgument
from fresco.api.inference import grpc_service_pb2 as pb
from predictor.metrics import PredictorMetrics
from predictor.models import ModelStore, State
from predictor.overrides import parse_load_parameters, write_files
from predictor.repository import ModelRepository
from predictor.triton import config_from_triton

TRITON_CONFIG = {
    "name": "demo",
    "platform": "onnxruntime_onnx",
    "max_batch_size": 16,
    "input": [{"name": "X", "data_type": "TYPE_FP32", "dims": ["8"]}],
    "output": [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [2]}],
    "dynamic_batching": {
        "preferred_batch_size": [4, 8],
        "max_queue_delay_microseconds": 100,
        "default_queue_policy": {"max_queue_size": 50},
    },
    "version_policy": {"specific": {"versions": ["1"]}},
    "instance_group": [{"count": 2, "kind": "KIND_CPU"}, {"count": 1}],
    "parameters": {"owner": {"string_value": "risk"}},
    "model_warmup": [
        {"name": "zeros", "batch_size": 2, "inputs": {"X": {"data_type": "TYPE_FP32", "dims": [8], "zero_data": True}}}
    ],
}


def parameters(**values: str | bytes) -> dict[str, pb.ModelRepositoryParameter]:
    """Load parameters as tritonclient sends them: strings as string_param, files as bytes_param."""
    found = {}
    for key, value in values.items():
        key = key.replace("__", ":").replace("_slash_", "/").replace("_onnx", ".onnx")
        if isinstance(value, bytes):
            found[key] = pb.ModelRepositoryParameter(bytes_param=value)
        else:
            found[key] = pb.ModelRepositoryParameter(string_param=value)
    return found


def test_triton_config_maps_onto_the_model_config() -> None:
    config = config_from_triton("demo", json.dumps(TRITON_CONFIG))
    assert config.backend == "onnxruntime"
    assert config.batching.enabled
    assert (config.batching.max_batch_size, config.batching.preferred_batch_sizes) == (16, [4, 8])
    assert (config.batching.max_queue_delay_us, config.batching.max_queue_size) == (100, 50)
    assert [(t.name, t.datatype, t.shape) for t in config.inputs] == [("X", "FP32", [-1, 8])]
    assert [(t.name, t.shape) for t in config.outputs] == [("probabilities", [-1, 2])]
    assert config.version_policy.specific == [1]
    assert config.instance_count == 3
    assert config.parameters == {"owner": "risk"}
    (sample,) = config.warmup.samples
    assert (sample.name, sample.batch_size, sample.inputs["X"].zero_data, sample.inputs["X"].dims) == (
        "zeros",
        2,
        True,
        [8],
    )
    # Without max_batch_size the dims are the whole shape, and nothing batches.
    plain = config_from_triton("demo", json.dumps({"input": [{"name": "X", "data_type": "TYPE_FP32", "dims": [3, 8]}]}))
    assert (plain.batching.enabled, plain.inputs[0].shape) == (False, [3, 8])


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ("{not json", "parameters['config']: not valid JSON"),
        ('["a list"]', "parameters['config']: (top): expected an object"),
        (json.dumps({"name": "other"}), "name: 'other' differs from the model being loaded, 'demo'"),
        (json.dumps({"sequence_batching": {}}), "(top): unsupported fields ['sequence_batching']"),
        (json.dumps({"platform": "pytorch_libtorch"}), "platform: 'pytorch_libtorch' is not served here"),
        (json.dumps({"input": [{"name": "X", "data_type": "TYPE_FP8"}]}), "input[0].data_type: expected one of"),
        (json.dumps({"input": [{"name": "X", "data_type": "TYPE_FP32", "reshape": {}}]}), "input[0]: unsupported"),
        (json.dumps({"max_batch_size": "many"}), "max_batch_size: expected an integer, got 'many'"),
        (json.dumps({"instance_group": [{"count": 1, "gpus": [0]}]}), "instance_group[0]: unsupported fields ['gpus']"),
        (json.dumps({"instance_group": [{"kind": "KIND_TPU"}]}), "instance_group[0].kind: 'KIND_TPU'"),
        (json.dumps({"default_model_filename": "model.pt"}), "only 'model.onnx' is supported"),
        (
            json.dumps({"max_batch_size": 4, "dynamic_batching": {"preferred_batch_size": [8]}}),
            "batching: Value error, preferred_batch_sizes [8] must lie in 1..max_batch_size (4)",
        ),
    ],
)
def test_a_config_the_predictor_cannot_honour_is_refused_naming_the_field(config: str, problem: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(problem)):
        parse_load_parameters("demo", parameters(config=config))


@pytest.mark.parametrize(
    "path",
    ["../evil.onnx", "1/../../evil.onnx", "/etc/passwd", "", "1/./model.onnx", "1\\\\..\\\\x", "a\0b"],
)
def test_file_paths_that_could_leave_the_model_directory_are_refused(path: str) -> None:
    given = {"config": pb.ModelRepositoryParameter(string_param="{}")}
    given[f"file:{path}"] = pb.ModelRepositoryParameter(bytes_param=b"x")
    with pytest.raises(InvalidArgument, match="expected a path relative to the model directory"):
        parse_load_parameters("demo", given)


def test_files_need_a_config_and_parameters_must_be_known() -> None:
    files = {"file:1/model.onnx": pb.ModelRepositoryParameter(bytes_param=b"x")}
    with pytest.raises(InvalidArgument, match="files given without 'config'"):
        parse_load_parameters("demo", files)
    with pytest.raises(InvalidArgument, match=r"parameters\['colour'\]: unknown load parameter"):
        parse_load_parameters("demo", parameters(colour="red"))
    with pytest.raises(InvalidArgument, match=r"parameters\['file:1/model.onnx'\]: expected a bytes_param"):
        parse_load_parameters(
            "demo", {**parameters(config="{}"), "file:1/model.onnx": pb.ModelRepositoryParameter(string_param="x")}
        )
    assert parse_load_parameters("demo", {}) is None


def test_files_are_written_inside_a_fresh_directory(tmp_path: Path) -> None:
    first = write_files(tmp_path, "demo", {"1/model.onnx": b"one", "warmup/x.bin": b"x"})
    second = write_files(tmp_path, "demo", {"1/model.onnx": b"two"})
    assert first != second
    assert first.parent == second.parent == tmp_path
    assert (first / "1" / "model.onnx").read_bytes() == b"one"
    assert (second / "1" / "model.onnx").read_bytes() == b"two"


async def test_load_with_a_config_overrides_the_repository(repository: Path, executor: ThreadPoolExecutor) -> None:
    store = ModelStore(ModelRepository(repository), executor)
    try:
        override = parse_load_parameters("demo", parameters(config=json.dumps(TRITON_CONFIG)))
        model = await store.load("demo", override)
        assert model.state is State.READY, model.reason
        version = store.get("demo")
        assert version.max_batch_size == 16
        assert version.batcher is not None
        assert version.batcher.policy.preferred_batch_sizes == (4, 8)
        assert [spec.name for spec in version.outputs] == ["probabilities"]
        # A load without parameters goes back to the repository's config.
        await store.load("demo")
        assert store.get("demo").max_batch_size == 64
    finally:
        await store.close()


async def test_load_with_files_serves_a_model_the_repository_lacks(
    repository: Path, executor: ThreadPoolExecutor
) -> None:
    registry = CollectorRegistry()
    store = ModelStore(ModelRepository(repository), executor, metrics=PredictorMetrics(registry))
    onnx = (repository / "demo" / "1" / "model.onnx").read_bytes()
    config = json.dumps({"max_batch_size": 8, "dynamic_batching": {}})
    try:
        override = parse_load_parameters("inline", parameters(config=config, file__1_slash_model_onnx=onnx))
        assert override is not None
        assert list(override.files) == ["1/model.onnx"]
        model = await store.load("inline", override)
        assert model.state is State.READY, model.reason
        assert model.override_dir is not None
        root = store.override_root
        assert root is not None
        assert model.override_dir.parent == root
        rows = np.zeros((3, 8), np.float32)
        assert (await store.infer(store.get("inline"), {"X": rows}, ["label"]))["label"].shape == (3,)
        written = model.override_dir
        await store.unload("inline")
        assert not written.exists()

        # Files that do not load leave no model, no directory and no lock behind.
        broken = parse_load_parameters("junk", parameters(config="{}", file__1_slash_model_onnx=b"not onnx"))
        failed = await store.load("junk", broken)
        assert failed.state is State.UNAVAILABLE
        assert "junk" not in store.models
        assert list(root.iterdir()) == []
        assert len(store.locks) == 0
        labelled = {s.labels.get("model") for family in registry.collect() for s in family.samples}
        assert "junk" not in labelled
        assert "inline" in labelled
    finally:
        await store.close()
    assert not root.exists()
