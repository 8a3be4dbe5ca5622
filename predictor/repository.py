"""The model repository on disk: `<repo>/<model>/config.yaml` and `<repo>/<model>/<version>/model.onnx`."""

from __future__ import annotations

import re
from pathlib import Path

from chassis.errors import InvalidArgument, NotFound

MODEL_FILE = "model.onnx"
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_model_name(name: str) -> None:
    """INVALID_ARGUMENT unless `name` can name a model directory."""
    if not _MODEL_NAME.match(name):
        raise InvalidArgument(f"model name {name!r}: expected letters, digits, '_', '.', '-'")


def version_numbers(model_dir: Path) -> list[int]:
    """The numbered version directories of a model directory, ascending."""
    return sorted(
        int(p.name)
        for p in model_dir.iterdir()
        if p.is_dir() and p.name.isascii() and p.name.isdigit() and len(p.name) <= 18
    )


class ModelRepository:
    """Reads model directories; knows nothing of loading or serving."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def model_names(self) -> list[str]:
        """Every model directory in the repository, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _MODEL_NAME.match(p.name))

    def model_dir(self, name: str) -> Path:
        """The directory of a model, checked to exist."""
        check_model_name(name)
        path = self.root / name
        if not path.is_dir():
            raise NotFound(f"model {name!r} is not in the repository {self.root}")
        return path

    def versions(self, name: str) -> list[int]:
        """The numbered version directories of a model, ascending."""
        return version_numbers(self.model_dir(name))

    def has_model(self, name: str) -> bool:
        """Whether the repository holds a directory for `name`."""
        return bool(_MODEL_NAME.match(name)) and (self.root / name).is_dir()

    def model_file(self, name: str, version: int) -> Path:
        """The model file of one version."""
        return self.model_dir(name) / str(version) / MODEL_FILE

    def fingerprint(self, name: str) -> tuple[tuple[str, int, int], ...]:
        """Size and modification time of every file of a model, to notice changes when polling."""
        model_dir = self.root / name
        entries = []
        for path in sorted(model_dir.rglob("*")):
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed while we looked
                continue
            if path.is_file():
                entries.append((str(path.relative_to(model_dir)), stat.st_size, stat.st_mtime_ns))
        return tuple(entries)
