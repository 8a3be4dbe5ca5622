"""Regenerate the Python code for every contract under protos/ into fresco/api/, and the Go client's
stubs into clients/go/gen/.

protoc names Python modules after proto paths (fresco/gateway/v1 -> fresco.gateway.v1), which
would mix generated modules into the hand-written `fresco` package. So the code is generated into a
scratch directory, its imports are rewritten to live under `fresco.api`, and the result replaces
fresco/api/ whole. The Go stubs come from buf with buf.gen.go.yaml and the local plugins protoc-gen-go
and protoc-gen-go-grpc, installed at the pinned versions below from the Go module proxy into .cache/go-bin/.
Run it with `make proto`; CI fails when it changes anything.
"""

from __future__ import annotations

import os
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

# The Go plugins buf runs, pinned: each is built once into .cache/go-bin/<name>@<version>/.
GO_PLUGINS = {
    "protoc-gen-go": ("google.golang.org/protobuf/cmd/protoc-gen-go", "v1.36.11"),
    "protoc-gen-go-grpc": ("google.golang.org/grpc/cmd/protoc-gen-go-grpc", "v1.6.1"),
}
GO_INSTALLED_AT = Path("/usr/local/go/bin/go")  # where go.dev's installer puts it

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


def _go() -> str:
    found = shutil.which("go") or (str(GO_INSTALLED_AT) if GO_INSTALLED_AT.exists() else None)
    if found is None:
        sys.exit("make proto needs Go 1.24 or later on PATH for the Go client's stubs: https://go.dev/dl")
    return found


def generate_go() -> None:
    """clients/go/gen/ from buf.gen.go.yaml, with the pinned plugins on PATH ahead of any others."""
    plugin_dirs: list[str] = []
    for name, (package, version) in GO_PLUGINS.items():
        bindir = ROOT / ".cache" / "go-bin" / f"{name}@{version}"
        if not (bindir / name).exists():
            subprocess.run(
                [_go(), "install", f"{package}@{version}"], check=True, env={**os.environ, "GOBIN": str(bindir)}
            )
        plugin_dirs.append(str(bindir))
    env = {**os.environ, "PATH": os.pathsep.join([*plugin_dirs, os.environ.get("PATH", "")])}
    buf = Path(sys.executable).parent / "buf"
    subprocess.run([str(buf), "generate", "--template", "buf.gen.go.yaml"], check=True, cwd=ROOT, env=env)


if __name__ == "__main__":
    generate()
    generate_go()
