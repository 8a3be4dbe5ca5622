"""Weights held once per machine, however many processes serve the model.

ONNX Runtime copies a model's initialisers into each session's heap, and pre-packs the weights of
matrix products into a second, kernel-specific layout: with `--workers 4`, four private copies. Here a
model is instead optimised once into a cache entry, an ONNX file plus one weights file that also holds
the pre-packed blobs (`session.save_external_prepacked_constant_initializers`). Sessions built from
the entry memory-map the weights file read-only, so every process on the machine reads the same page
cache pages, and compute with the same kernels on the same pre-packed data as a session built from
the model's bytes: answers are bit for bit the same.

An entry is named by a digest of the model's bytes, ONNX Runtime's version and the CPU (pre-packed
layouts depend on both), and is written in a private directory renamed into place once complete. It
is never rewritten: a new model version is a new entry, and a session keeps its mapping of the old one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "weights.bin"
LAYOUT = "1"  # bump when the entry's layout or the way it is produced changes
DEFAULT_DIR = Path.home() / ".cache" / "fresco" / "shared-weights"
# Initialisers below this size stay inside the ONNX file (shapes, scalars): not worth a mapping.
EXTERNAL_MIN_BYTES = 1024
KEEP_UNUSED_S = 7 * 24 * 3600.0


def machine_fingerprint() -> str:
    """What pre-packed layouts depend on: ONNX Runtime's version, the architecture and the CPU's features."""
    flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")):
                flags += line
            if line.startswith(("flags", "Features")):
                break  # the first CPU's are everyone's
    return f"ort={ort.__version__};arch={platform.machine()};cpu={hashlib.sha256(flags.encode()).hexdigest()[:16]}"


def entry_key(model_bytes: bytes, level: ort.GraphOptimizationLevel) -> str:
    """The cache entry's name for a model file optimised at `level` on this machine."""
    digest = hashlib.sha256(model_bytes)
    digest.update(f"|{LAYOUT}|{int(level)}|{machine_fingerprint()}".encode())
    return digest.hexdigest()[:40]


class SharedWeights:
    """A directory of optimised models whose weights every process maps from the same file."""

    def __init__(self, root: Path | None = None, keep_unused_s: float = KEEP_UNUSED_S) -> None:
        self.root = root or DEFAULT_DIR
        self.keep_unused_s = keep_unused_s

    def model_path(self, model_bytes: bytes, options: ort.SessionOptions, providers: list[str]) -> Path:
        """The optimised model for `model_bytes`, written now unless another process (or an earlier
        run) already did; `options` are those of the sessions that will run it."""
        key = entry_key(model_bytes, options.graph_optimization_level)
        entry = self.root / key
        if not (entry / MODEL_FILE).is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            with self._locked(key):  # one writer; the other workers wait for its entry
                if not (entry / MODEL_FILE).is_file():
                    self._write(entry, model_bytes, options, providers)
                    self.prune()
        with contextlib.suppress(OSError):  # a read-only cache serves all the same
            os.utime(entry)  # when it was last used, for prune()
        return entry / MODEL_FILE

    def prune(self) -> list[Path]:
        """Remove the entries (and abandoned partial ones) nothing was loaded from for `keep_unused_s`."""
        cutoff = time.time() - self.keep_unused_s
        removed = []
        for path in self.root.iterdir():
            try:
                stale = path.is_dir() and path.stat().st_mtime < cutoff
            except FileNotFoundError:
                continue
            if stale:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        if removed:
            log.info(
                "shared weights: removed %d entries unused for %.0f days", len(removed), self.keep_unused_s / 86400
            )
        return removed

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        with (self.root / f".{key}.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, entry: Path, model_bytes: bytes, options: ort.SessionOptions, providers: list[str]) -> None:
        start = time.perf_counter()
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=self.root))
        try:
            saving = _copy_options(options)
            saving.optimized_model_filepath = str(staging / MODEL_FILE)
            saving.add_session_config_entry("session.optimized_model_external_initializers_file_name", WEIGHTS_FILE)
            saving.add_session_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes", str(EXTERNAL_MIN_BYTES)
            )
            saving.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
            session = ort.InferenceSession(model_bytes, sess_options=saving, providers=providers)
            del session  # its private copy of the weights goes with it
            for name in (WEIGHTS_FILE, MODEL_FILE):
                path = staging / name
                if path.exists():  # a model without large initialisers has no weights file
                    with path.open("rb") as written:
                        os.fsync(written.fileno())
            if entry.exists():  # left by something else than this code (which renames complete entries only)
                shutil.rmtree(entry)
            staging.rename(entry)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("shared weights: wrote %s in %.1fs", entry, time.perf_counter() - start)


def _copy_options(options: ort.SessionOptions) -> ort.SessionOptions:
    """Fresh options with the settings OnnxSession sets (SessionOptions cannot be copied)."""
    copy = ort.SessionOptions()
    copy.graph_optimization_level = options.graph_optimization_level
    copy.intra_op_num_threads = options.intra_op_num_threads
    copy.inter_op_num_threads = options.inter_op_num_threads
    copy.execution_mode = options.execution_mode
    copy.log_severity_level = options.log_severity_level
    return copy
