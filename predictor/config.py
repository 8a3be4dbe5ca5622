"""A model's `config.yaml`: its tensors, backend and version policy, validated at load."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from chassis.errors import InvalidArgument, invalid_config
from chassis.tensors import DATATYPES

CONFIG_FILE = "config.yaml"


class TensorConfig(BaseModel):
    """One input or output tensor as the config declares it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    datatype: str
    shape: list[int] = Field(description="Dimensions, -1 for variable ones (the batch dimension included).")
    features: list[str] | None = Field(
        default=None,
        description="For a feature-vector input: the feature name of each position of its last dimension.",
    )
    allow_nan: bool = Field(default=True, description="Whether NaN values are accepted in this input.")

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, value: str) -> str:
        if value not in DATATYPES:
            raise ValueError(f"unknown datatype {value!r}; expected one of {', '.join(sorted(DATATYPES))}")
        return value

    @field_validator("shape")
    @classmethod
    def _valid_dims(cls, value: list[int]) -> list[int]:
        if any(dim < -1 or dim == 0 for dim in value):
            raise ValueError(f"shape {value}: each dimension must be positive or -1")
        return value

    @model_validator(mode="after")
    def _features_fit_shape(self) -> TensorConfig:
        if self.features is not None:
            if not self.shape:
                raise ValueError(f"{self.name}: features need a shape with at least one dimension")
            if self.shape[-1] != -1 and self.shape[-1] != len(self.features):
                raise ValueError(
                    f"{self.name}: {len(self.features)} features but the last dimension is {self.shape[-1]}"
                )
        return self


class VersionPolicy(BaseModel):
    """Which versions under the model directory are served: the latest N, all, or specific ones."""

    model_config = ConfigDict(extra="forbid")

    latest: int | None = Field(default=1, ge=1)
    all: bool = False
    specific: list[int] | None = None

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve among those on disk, ascending."""
        ordered = sorted(available)
        if self.all:
            return ordered
        if self.specific is not None:
            return [v for v in ordered if v in set(self.specific)]
        return ordered[-(self.latest or 1) :]


class BatchingConfig(BaseModel):
    """The dynamic batcher of a model (on by default for models with a variable batch dimension)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    max_batch_size: int = Field(default=64, ge=1, description="Most rows one execution runs.")
    max_queue_delay_us: int = Field(
        default=0,
        ge=0,
        description=(
            "Longest a request waits for others to share its execution, counted from its arrival. "
            "0 batches only what queued while the model was busy, so an idle model never waits."
        ),
    )
    preferred_batch_sizes: list[int] = Field(
        default_factory=list, description="Sizes dispatched as soon as they are reached."
    )
    max_queue_size: int = Field(default=1024, ge=1, description="Queued requests beyond which RESOURCE_EXHAUSTED.")

    @model_validator(mode="after")
    def _preferred_fit(self) -> BatchingConfig:
        if any(size < 1 or size > self.max_batch_size for size in self.preferred_batch_sizes):
            raise ValueError(
                f"preferred_batch_sizes {self.preferred_batch_sizes} must lie in "
                f"1..max_batch_size ({self.max_batch_size})"
            )
        return self


class WarmupInput(BaseModel):
    """One input of a warm-up sample: zeros, seeded random values, explicit values, or a file."""

    model_config = ConfigDict(extra="forbid")

    dims: list[int] | None = Field(
        default=None,
        description=(
            "Dimensions after the batch dimension (all of them for a model that does not batch); "
            "default the model's, variable ones as 1."
        ),
    )
    zero_data: bool = False
    random_data: bool = False
    data: list[float | int | bool | str] | None = Field(
        default=None, description="Explicit values of one row, repeated for each row of the batch."
    )
    input_data_file: str | None = Field(
        default=None,
        description="A file under <model>/warmup/ holding one row in the raw wire form (BYTES length-prefixed).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> WarmupInput:
        given = [self.zero_data, self.random_data, self.data is not None, self.input_data_file is not None]
        if sum(given) != 1:
            raise ValueError("give exactly one of zero_data, random_data, data, input_data_file")
        if self.dims is not None and any(dim < 1 for dim in self.dims):
            raise ValueError(f"dims {self.dims}: each dimension must be positive")
        return self


class WarmupSample(BaseModel):
    """A warm-up request (Triton's `model_warmup`): a name, a batch size and each input's data."""

    model_config = ConfigDict(extra="forbid")

    name: str
    batch_size: int = Field(default=1, ge=1)
    inputs: dict[str, WarmupInput]


class WarmupConfig(BaseModel):
    """Runs before a version turns READY: the configured samples, else synthetic inputs."""

    model_config = ConfigDict(extra="forbid")

    runs: int = Field(default=5, ge=1, description="Warm runs of each sample or synthetic batch size.")
    batch_sizes: list[int] = Field(
        default_factory=list, description="Synthetic batch sizes to warm; default 1 plus the preferred batch sizes."
    )
    samples: list[WarmupSample] = Field(
        default_factory=list, description="Warm-up requests to run instead of synthetic inputs."
    )
    latency_runs: int = Field(
        default=200, ge=1, description="Timed runs the p99 held to the latency budget is taken over."
    )
    latency_attempts: int = Field(
        default=3, ge=1, description="Measurements over the budget before the version is declared UNAVAILABLE."
    )


class ModelConfig(BaseModel):
    """The whole `config.yaml` of a model."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    backend: Literal["auto", "onnxruntime", "tensorrt"] = "auto"
    inputs: list[TensorConfig] = Field(default_factory=list)
    outputs: list[TensorConfig] = Field(default_factory=list)
    version_policy: VersionPolicy = Field(default_factory=VersionPolicy)
    default_version: int | None = None
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    instance_count: int = Field(default=1, ge=1, description="Executions of one version that may run at once.")
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    latency_budget_ms: float | None = Field(
        default=None,
        gt=0,
        description="A version whose warm p99 exceeds this on every attempt fails to become READY.",
    )
    tensorrt: dict[str, str | int | bool] = Field(
        default_factory=dict, description="TensorRT build options (fp16, int8, workspace_mb, opt_batch_size)."
    )
    parameters: dict[str, str] = Field(default_factory=dict)


def read_config(model_dir: Path) -> ModelConfig:
    """Parse and validate `<model_dir>/config.yaml`; a missing file means all defaults."""
    path = model_dir / CONFIG_FILE
    if not path.exists():
        return ModelConfig()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise InvalidArgument(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{path}: expected a mapping at the top level")
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as err:
        raise invalid_config(str(path), err) from None
