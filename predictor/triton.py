"""A model's configuration in Triton's form: the ModelConfig message that Triton's tools
(perf_analyzer, model analyzers) read, and Triton's JSON config that RepositoryModelLoad may carry."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from chassis.errors import InvalidArgument, invalid_config
from fresco.api.inference import model_config_pb2 as mc
from predictor.backends.base import TensorSpec
from predictor.config import ModelConfig
from predictor.repository import MODEL_FILE

_DATA_TYPE = {
    "BOOL": mc.TYPE_BOOL,
    "UINT8": mc.TYPE_UINT8,
    "UINT16": mc.TYPE_UINT16,
    "UINT32": mc.TYPE_UINT32,
    "UINT64": mc.TYPE_UINT64,
    "INT8": mc.TYPE_INT8,
    "INT16": mc.TYPE_INT16,
    "INT32": mc.TYPE_INT32,
    "INT64": mc.TYPE_INT64,
    "FP16": mc.TYPE_FP16,
    "FP32": mc.TYPE_FP32,
    "FP64": mc.TYPE_FP64,
    "BYTES": mc.TYPE_STRING,
    "BF16": mc.TYPE_BF16,
}


def _dims(spec: TensorSpec, batched: bool) -> list[int]:
    # Triton leaves the batch dimension out of dims when the model batches.
    return list(spec.shape[1:] if batched else spec.shape)


def triton_config(
    name: str,
    config: ModelConfig,
    platform: str,
    backend: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    max_batch_size: int,
) -> mc.ModelConfig:
    """The ModelConfig message for a loaded model version."""
    batched = max_batch_size > 0
    message = mc.ModelConfig(
        name=name,
        platform=platform,
        backend=backend,
        max_batch_size=max_batch_size,
        default_model_filename="model.onnx",
    )
    policy = config.version_policy
    if policy.all:
        message.version_policy.all.SetInParent()
    elif policy.specific is not None:
        message.version_policy.specific.versions.extend(policy.specific)
    else:
        message.version_policy.latest.num_versions = policy.latest or 1
    for spec in inputs:
        message.input.add(name=spec.name, data_type=_DATA_TYPE[spec.datatype], dims=_dims(spec, batched))
    for spec in outputs:
        message.output.add(name=spec.name, data_type=_DATA_TYPE[spec.datatype], dims=_dims(spec, batched))
    kind = mc.ModelInstanceGroup.KIND_GPU if platform == "tensorrt_plan" else mc.ModelInstanceGroup.KIND_CPU
    message.instance_group.add(name=f"{name}_0", count=config.instance_count, kind=kind)
    if batched and config.batching.enabled:
        batching = config.batching
        message.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_sizes)
        message.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us
        message.dynamic_batching.default_queue_policy.max_queue_size = batching.max_queue_size
    for key, value in config.parameters.items():
        message.parameters[key].string_value = value
    return message


# -- Triton's JSON model configuration, as RepositoryModelLoad's `config` parameter carries it --------

_DATATYPE_OF_TRITON = {mc.DataType.Name(value): datatype for datatype, value in _DATA_TYPE.items()}
_BACKENDS = {
    "onnxruntime_onnx": "onnxruntime",
    "onnxruntime": "onnxruntime",
    "tensorrt_plan": "tensorrt",
    "tensorrt": "tensorrt",
}
_TOP_LEVEL = {
    "name",
    "platform",
    "backend",
    "max_batch_size",
    "input",
    "output",
    "version_policy",
    "instance_group",
    "dynamic_batching",
    "parameters",
    "model_warmup",
    "default_model_filename",
}
_WHERE = "parameters['config']"


def _fail(path: str, problem: str) -> InvalidArgument:
    return InvalidArgument(f"{_WHERE}: {path}: {problem}")


def _mapping(value: object, path: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, f"expected an object, got {type(value).__name__}")
    if unknown := sorted(set(value) - allowed):
        raise _fail(path, f"unsupported fields {unknown}; the predictor maps {sorted(allowed)}")
    return value


def _int(value: object, path: str) -> int:
    # Protobuf's JSON form writes int64 as strings.
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _fail(path, f"expected an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise _fail(path, f"expected an integer, got {value!r}") from None


def _tensors(value: object, path: str, batched: bool) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _fail(path, "expected a list")
    tensors = []
    for index, item in enumerate(value):
        where = f"{path}[{index}]"
        # "features" is Fresco's one addition to Triton's tensor: the feature name of each position of a
        # feature-vector input, so a model loaded through the API is fed by name like one from the repository.
        tensor = _mapping(item, where, {"name", "data_type", "dims", "features"})
        datatype = _DATATYPE_OF_TRITON.get(str(tensor.get("data_type", "")))
        if datatype is None:
            raise _fail(
                f"{where}.data_type", f"expected one of {sorted(_DATATYPE_OF_TRITON)}, got {tensor.get('data_type')!r}"
            )
        dims = [_int(dim, f"{where}.dims") for dim in tensor.get("dims", [])]
        entry: dict[str, Any] = {
            "name": tensor.get("name"),
            "datatype": datatype,
            "shape": [-1, *dims] if batched else dims,
        }
        if "features" in tensor:
            features = tensor["features"]
            if not isinstance(features, list) or not all(isinstance(f, str) and f for f in features):
                raise _fail(f"{where}.features", f"expected a list of feature names, got {features!r}")
            entry["features"] = features
        tensors.append(entry)
    return tensors


def _warmup_samples(value: object) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _fail("model_warmup", "expected a list")
    samples = []
    for index, item in enumerate(value):
        where = f"model_warmup[{index}]"
        sample = _mapping(item, where, {"name", "batch_size", "inputs"})
        inputs = {}
        for name, given in _mapping(sample.get("inputs", {}), f"{where}.inputs", set(sample.get("inputs", {}))).items():
            fields = _mapping(
                given, f"{where}.inputs[{name!r}]", {"data_type", "dims", "zero_data", "random_data", "input_data_file"}
            )
            entry: dict[str, Any] = {
                key: fields[key] for key in ("zero_data", "random_data", "input_data_file") if key in fields
            }
            if "dims" in fields:
                entry["dims"] = [_int(dim, f"{where}.inputs[{name!r}].dims") for dim in fields["dims"]]
            inputs[name] = entry
        samples.append(
            {
                "name": sample.get("name", f"sample {index}"),
                "batch_size": _int(sample.get("batch_size", 1), where),
                "inputs": inputs,
            }
        )
    return samples


def config_from_triton(name: str, text: str) -> ModelConfig:
    """The model configuration a Triton JSON config describes; INVALID_ARGUMENT naming each field
    the predictor cannot honour."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidArgument(f"{_WHERE}: not valid JSON: {err}") from None
    triton = _mapping(raw, "(top)", _TOP_LEVEL)
    if triton.get("name", name) != name:
        raise _fail("name", f"{triton['name']!r} differs from the model being loaded, {name!r}")
    if triton.get("default_model_filename", MODEL_FILE) != MODEL_FILE:
        raise _fail("default_model_filename", f"only {MODEL_FILE!r} is supported")
    config: dict[str, Any] = {"name": name}
    for key in ("platform", "backend"):
        if value := triton.get(key):
            if value not in _BACKENDS:
                raise _fail(key, f"{value!r} is not served here; expected one of {sorted(_BACKENDS)}")
            config["backend"] = _BACKENDS[value]
    max_batch_size = _int(triton.get("max_batch_size", 0), "max_batch_size")
    batched = max_batch_size > 0
    batching: dict[str, Any] = {"enabled": batched and "dynamic_batching" in triton}
    if batched:
        batching["max_batch_size"] = max_batch_size
    if "dynamic_batching" in triton:
        dynamic = _mapping(
            triton["dynamic_batching"],
            "dynamic_batching",
            {"preferred_batch_size", "max_queue_delay_microseconds", "default_queue_policy"},
        )
        batching["preferred_batch_sizes"] = [
            _int(size, "dynamic_batching.preferred_batch_size") for size in dynamic.get("preferred_batch_size", [])
        ]
        batching["max_queue_delay_us"] = _int(
            dynamic.get("max_queue_delay_microseconds", 0), "dynamic_batching.max_queue_delay_microseconds"
        )
        policy = _mapping(
            dynamic.get("default_queue_policy", {}), "dynamic_batching.default_queue_policy", {"max_queue_size"}
        )
        if "max_queue_size" in policy:
            batching["max_queue_size"] = _int(
                policy["max_queue_size"], "dynamic_batching.default_queue_policy.max_queue_size"
            )
    config["batching"] = batching
    for key, target in (("input", "inputs"), ("output", "outputs")):
        if key in triton:
            config[target] = _tensors(triton[key], key, batched)
    if "version_policy" in triton:
        policy = _mapping(triton["version_policy"], "version_policy", {"latest", "all", "specific"})
        if "latest" in policy:
            latest = _mapping(policy["latest"], "version_policy.latest", {"num_versions"})
            config["version_policy"] = {
                "latest": _int(latest.get("num_versions", 1), "version_policy.latest.num_versions")
            }
        elif "all" in policy:
            config["version_policy"] = {"all": True}
        elif "specific" in policy:
            specific = _mapping(policy["specific"], "version_policy.specific", {"versions"})
            versions = [_int(v, "version_policy.specific.versions") for v in specific.get("versions", [])]
            config["version_policy"] = {"specific": versions}
    if "instance_group" in triton:
        groups = triton["instance_group"]
        if not isinstance(groups, list):
            raise _fail("instance_group", "expected a list")
        count = 0
        for index, group in enumerate(groups):
            fields = _mapping(group, f"instance_group[{index}]", {"name", "count", "kind"})
            if fields.get("kind", "KIND_AUTO") not in ("KIND_AUTO", "KIND_CPU", "KIND_GPU"):
                raise _fail(f"instance_group[{index}].kind", f"{fields['kind']!r} is not supported")
            count += _int(fields.get("count", 1), f"instance_group[{index}].count")
        config["instance_count"] = max(count, 1)
    if "parameters" in triton:
        parameters = {}
        for key, value in _mapping(triton["parameters"], "parameters", set(triton["parameters"])).items():
            parameters[key] = str(_mapping(value, f"parameters[{key!r}]", {"string_value"}).get("string_value", ""))
        config["parameters"] = parameters
    if "model_warmup" in triton:
        config["warmup"] = {"samples": _warmup_samples(triton["model_warmup"])}
    try:
        return ModelConfig.model_validate(config)
    except ValidationError as err:
        raise invalid_config(_WHERE, err) from None
