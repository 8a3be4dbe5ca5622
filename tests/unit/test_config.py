"""A model's config.yaml and its version policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from chassis.errors import InvalidArgument
from predictor.config import ModelConfig, VersionPolicy, read_config

VALID = """
name: demo
backend: onnxruntime
inputs:
  - name: X
    datatype: FP32
    shape: [-1, 3]
    features: [age, income, tenure]
    allow_nan: false
outputs:
  - {name: label, datatype: INT64, shape: [-1]}
version_policy: {latest: 2}
default_version: 3
parameters: {owner: risk-team}
"""


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "config.yaml").write_text(text)
    return tmp_path


def _error(model_dir: Path) -> str:
    with pytest.raises(InvalidArgument) as caught:
        read_config(model_dir)
    message = str(caught.value)
    assert message.startswith(f"{model_dir / 'config.yaml'}: "), message
    return message


def test_valid_config(tmp_path: Path) -> None:
    config = read_config(_write(tmp_path, VALID))
    (x,) = config.inputs
    assert (x.name, x.datatype, x.shape, x.features, x.allow_nan) == (
        "X",
        "FP32",
        [-1, 3],
        ["age", "income", "tenure"],
        False,
    )
    assert config.outputs[0].allow_nan is True
    assert config.outputs[0].features is None
    assert config.version_policy.latest == 2
    assert config.default_version == 3
    assert config.backend == "onnxruntime"
    assert config.parameters == {"owner": "risk-team"}


def test_missing_or_empty_file_means_defaults(tmp_path: Path) -> None:
    assert read_config(tmp_path) == ModelConfig()
    assert read_config(_write(tmp_path, "")) == ModelConfig()
    default = ModelConfig()
    assert default.backend == "auto"
    assert default.version_policy.select([1, 2, 3]) == [3]


def test_bad_yaml(tmp_path: Path) -> None:
    assert "not valid YAML" in _error(_write(tmp_path, "inputs: [\n  - name: X\n    shape: [1, 2\n"))


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert _error(_write(tmp_path, "- a\n- b\n")).endswith("expected a mapping at the top level")


def test_unknown_key(tmp_path: Path) -> None:
    assert "colour: Extra inputs are not permitted" in _error(_write(tmp_path, "colour: blue\n"))
    nested = _error(_write(tmp_path, "inputs:\n  - {name: X, datatype: FP32, shape: [-1], dtype: FP32}\n"))
    assert "inputs.0.dtype: Extra inputs are not permitted" in nested
    policy = _error(_write(tmp_path, "version_policy: {newest: 2}\n"))
    assert "version_policy.newest" in policy


def test_bad_datatype(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, "inputs:\n  - {name: X, datatype: FLOAT32, shape: [-1, 3]}\n"))
    assert "inputs.0.datatype" in message
    assert "unknown datatype 'FLOAT32'" in message


def test_bad_shape(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, "outputs:\n  - {name: y, datatype: FP32, shape: [-1, 0]}\n"))
    assert "outputs.0.shape" in message
    assert "each dimension must be positive or -1" in message
    assert "outputs.0.shape" in _error(_write(tmp_path, "outputs:\n  - {name: y, datatype: FP32, shape: [-2]}\n"))


def test_features_must_fit_the_last_dimension(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, "inputs:\n  - {name: X, datatype: FP32, shape: [-1, 4], features: [a, b, c]}\n"))
    assert "inputs.0" in message
    assert "X: 3 features but the last dimension is 4" in message
    scalar = _error(_write(tmp_path, "inputs:\n  - {name: X, datatype: FP32, shape: [], features: [a]}\n"))
    assert "X: features need a shape with at least one dimension" in scalar
    # A variable last dimension takes any number of features.
    ok = read_config(_write(tmp_path, "inputs:\n  - {name: X, datatype: FP32, shape: [-1, -1], features: [a, b]}\n"))
    assert ok.inputs[0].features == ["a", "b"]


def test_every_problem_is_reported(tmp_path: Path) -> None:
    message = _error(
        _write(tmp_path, "backend: tflite\ninputs:\n  - {name: X, datatype: F, shape: [-1]}\ndefault_version: x\n")
    )
    for field in ("backend", "inputs.0.datatype", "default_version"):
        assert field in message


@pytest.mark.parametrize(
    ("policy", "available", "served"),
    [
        (VersionPolicy(), [3, 1, 2], [3]),
        (VersionPolicy(latest=2), [3, 1, 7, 2], [3, 7]),
        (VersionPolicy(latest=5), [2, 1], [1, 2]),
        (VersionPolicy(all=True), [3, 1, 2], [1, 2, 3]),
        (VersionPolicy(all=True, latest=1), [3, 1, 2], [1, 2, 3]),
        (VersionPolicy(specific=[1, 3, 9]), [4, 3, 2, 1], [1, 3]),
        (VersionPolicy(specific=[]), [1, 2], []),
        (VersionPolicy(latest=1), [], []),
    ],
)
def test_version_policy_select(policy: VersionPolicy, available: list[int], served: list[int]) -> None:
    assert policy.select(available) == served


def test_warm_up_samples(tmp_path: Path) -> None:
    config = read_config(
        _write(
            tmp_path,
            """
warmup:
  samples:
    - name: typical
      batch_size: 4
      inputs:
        X: {data: [1, 2, 3]}
        text: {input_data_file: text.bin, dims: [2]}
  latency_runs: 50
  latency_attempts: 2
""",
        )
    )
    (sample,) = config.warmup.samples
    assert (sample.name, sample.batch_size) == ("typical", 4)
    assert sample.inputs["X"].data == [1, 2, 3]
    assert (sample.inputs["text"].input_data_file, sample.inputs["text"].dims) == ("text.bin", [2])
    assert (config.warmup.latency_runs, config.warmup.latency_attempts) == (50, 2)
    assert (ModelConfig().warmup.latency_runs, ModelConfig().warmup.latency_attempts) == (200, 3)


@pytest.mark.parametrize(
    ("inputs", "problem"),
    [
        ("{X: {zero_data: true, random_data: true}}", "give exactly one of zero_data, random_data, data"),
        ("{X: {}}", "give exactly one of zero_data, random_data, data"),
        ("{X: {zero_data: true, dims: [0]}}", "dims [0]: each dimension must be positive"),
        ("{X: {zero_data: true, colour: red}}", "colour: Extra inputs are not permitted"),
    ],
)
def test_bad_warm_up_samples_name_the_field(tmp_path: Path, inputs: str, problem: str) -> None:
    message = _error(_write(tmp_path, f"warmup: {{samples: [{{name: s, inputs: {inputs}}}]}}"))
    assert "warmup.samples.0.inputs.X" in message
    assert problem in message
