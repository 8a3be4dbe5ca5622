"""RepositoryModelLoad's parameters: `config`, a JSON model configuration (Triton's form) that
overrides the repository's, and `file:<path>`, model files sent inline, which are written to a
private directory the model is then loaded from (never outside it)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from chassis.errors import InvalidArgument
from fresco.api.inference import grpc_service_pb2 as pb
from predictor.config import ModelConfig
from predictor.triton import config_from_triton

CONFIG_KEY = "config"
FILE_PREFIX = "file:"
# Keys sibling workers exchange among themselves (see predictor.coordinator).
INTERNAL_PREFIX = "fresco."


@dataclass(frozen=True)
class LoadOverride:
    """What a load asks for beyond the repository: a configuration, and model files."""

    config: ModelConfig | None = None
    files: dict[str, bytes] = field(default_factory=dict)


def _relative_path(key: str) -> str:
    """The path of a `file:` key, refused when it could leave the model's directory."""
    text = key.removeprefix(FILE_PREFIX)
    path = PurePosixPath(text)
    if not text or "\\" in text or "\0" in text or path.is_absolute() or ".." in path.parts or "." in text.split("/"):
        raise InvalidArgument(
            f"parameters[{key!r}]: expected a path relative to the model directory such as "
            "'file:1/model.onnx', without '..', '.' or a leading '/'"
        )
    return str(path)


def parse_load_parameters(name: str, parameters: Mapping[str, pb.ModelRepositoryParameter]) -> LoadOverride | None:
    """The override a load's parameters describe, or None when they ask for none."""
    config: ModelConfig | None = None
    files: dict[str, bytes] = {}
    for key, value in parameters.items():
        if key.startswith(INTERNAL_PREFIX):
            continue
        if key == CONFIG_KEY:
            if value.WhichOneof("parameter_choice") != "string_param":
                raise InvalidArgument(f"parameters['{CONFIG_KEY}']: expected a string_param holding JSON")
            config = config_from_triton(name, value.string_param)
        elif key.startswith(FILE_PREFIX):
            if value.WhichOneof("parameter_choice") != "bytes_param":
                raise InvalidArgument(f"parameters[{key!r}]: expected a bytes_param holding the file")
            files[_relative_path(key)] = value.bytes_param
        else:
            raise InvalidArgument(
                f"parameters[{key!r}]: unknown load parameter; expected '{CONFIG_KEY}' or '{FILE_PREFIX}<path>'"
            )
    if files and config is None:
        # As Triton: files replace the model directory, so what to make of them must be said.
        raise InvalidArgument(f"parameters: files given without '{CONFIG_KEY}'; a load with files needs its config")
    if config is None:
        return None
    return LoadOverride(config, files)


def write_files(root: Path, name: str, files: Mapping[str, bytes]) -> Path:
    """A fresh private directory under `root` (an existing private directory) holding `files`;
    the caller removes it."""
    target = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    try:
        base = target.resolve()
        for relative, data in files.items():
            path = (base / relative).resolve()
            if not path.is_relative_to(base) or path == base:
                raise InvalidArgument(f"parameters['{FILE_PREFIX}{relative}']: the path leaves the model directory")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target
