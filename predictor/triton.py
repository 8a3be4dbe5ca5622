"""A served model's configuration in Triton's form, for the ModelConfig rpc that Triton's tools
(perf_analyzer, model analyzers) read."""

from __future__ import annotations

from collections.abc import Sequence

from fresco.api.inference import model_config_pb2 as mc
from predictor.backends.base import TensorSpec
from predictor.config import ModelConfig

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
