"""Regenerate the Python code for every contract under protos/ into fresco/api/.

protoc names Python modules after proto paths (fresco/gateway/v1 -> fresco.gateway.v1), which
would mix generated modules into the hand-written `fresco` package. So the code is generated into a
scratch directory, its imports are rewritten to live under `fresco.api`, and the result replaces
fresco/api/ whole. Run it with `make proto`; CI fails when it changes anything.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
TARGET = ROOT / "fresco" / "api"
HEADER = '"""Generated from protos/ by `make proto`. Do not edit."""\n'

# Top-level proto packages and where their Python modules go.
PACKAGES = {"fresco": "fresco.api", "inference": "fresco.api.inference"}

# A module path in an import line or a .pyi annotation: fresco.<area>.v1 or inference.
_FRESCO_MODULE = re.compile(r"(?<![\w.])fresco\.(?!api\b)(\w+)\.(v\d+)\b")
_IMPORT_LINE = re.compile(r"^(from|import) (fresco|inference)\b", re.MULTILINE)


def _rewrite(text: str, is_stub: bool) -> str:
    """Point the generated imports at fresco.api; leave serialized descriptors untouched."""
    out = []
    for line in text.splitlines(keepends=True):
        if is_stub or _IMPORT_LINE.match(line):
            line = _FRESCO_MODULE.sub(r"fresco.api.\1.\2", line)
            line = re.sub(r"^from inference import", "from fresco.api.inference import", line)
            line = re.sub(r"^import inference\.", "import fresco.api.inference.", line)
        out.append(line)
    return "".join(out)


def generate() -> None:
    bindir = Path(sys.executable).parent
    protos = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{PROTOS}",
                f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
                f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
                f"--python_out={scratch}",
                f"--grpc_python_out={scratch}",
                f"--mypy_out={scratch}",
                f"--mypy_grpc_out={scratch}",
                *protos,
            ],
            check=True,
            cwd=PROTOS,
        )
        staged = Path(scratch) / "staged"
        for top, module in PACKAGES.items():
            source = Path(scratch) / top
            dest = staged / Path(*module.split(".")[2:]) if module != "fresco.api" else staged
            shutil.copytree(source, dest, dirs_exist_ok=True)
        for path in sorted(staged.rglob("*")):
            if path.is_dir():
                (path / "__init__.py").write_text(HEADER)
            elif path.suffix in {".py", ".pyi"} and path.name != "__init__.py":
                path.write_text(_rewrite(path.read_text(), path.suffix == ".pyi"))
        (staged / "__init__.py").write_text(HEADER)
        shutil.rmtree(TARGET, ignore_errors=True)
        shutil.copytree(staged, TARGET)


if __name__ == "__main__":
    generate()
