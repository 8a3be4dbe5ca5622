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

ONNX Runtime does not save every model faithfully (a statically quantised CNN in QOperator format gets a
weights file shorter than its own graph says), so an entry is checked before it is renamed into place: a
session over it must answer a probe exactly as the session that wrote it. An entry that does not is kept
as a refusal (REFUSED_FILE, with the reason) instead of a model: every process then holds its own weights
at once, without trying the entry again.
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

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "weights.bin"
REFUSED_FILE = "refused.txt"  # instead of the model: why the optimised copy cannot stand in for it
LAYOUT = "2"  # bump when the entry's layout or the way it is produced changes
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


class Unshareable(Exception):
    """The model's optimised copy does not answer as the model does: sessions hold their own weights."""


class SharedWeights:
    """A directory of optimised models whose weights every process maps from the same file."""

    def __init__(self, root: Path | None = None, keep_unused_s: float = KEEP_UNUSED_S) -> None:
        self.root = root or DEFAULT_DIR
        self.keep_unused_s = keep_unused_s

    def model_path(self, model_bytes: bytes, options: ort.SessionOptions, providers: list[str]) -> Path:
        """The optimised model for `model_bytes`, written now unless another process (or an earlier
        run) already did; `options` are those of the sessions that will run it. Unshareable when the
        optimised copy does not answer as the model does."""
        key = entry_key(model_bytes, options.graph_optimization_level)
        entry = self.root / key
        if not _complete(entry):
            self.root.mkdir(parents=True, exist_ok=True)
            with self._locked(key):  # one writer; the other workers wait for its entry
                if not _complete(entry):
                    self._write(entry, model_bytes, options, providers)
                    self.prune()
        with contextlib.suppress(OSError):  # a read-only cache serves all the same
            os.utime(entry)  # when it was last used, for prune()
        refused = entry / REFUSED_FILE
        if refused.is_file():
            raise Unshareable(refused.read_text())
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
            session = self._save(model_bytes, saving, providers)
            refusal = _refusal(session, staging / MODEL_FILE, options, providers)
            del session  # its private copy of the weights goes with it
            if refusal is not None:
                for name in (WEIGHTS_FILE, MODEL_FILE):
                    (staging / name).unlink(missing_ok=True)
                (staging / REFUSED_FILE).write_text(refusal)
                log.warning("shared weights: the optimised copy of %s is refused: %s", entry.name, refusal)
            for name in (WEIGHTS_FILE, MODEL_FILE, REFUSED_FILE):
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

    def _save(self, model_bytes: bytes, saving: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
        """A session over the model's bytes that saves its optimised copy where `saving` says."""
        return ort.InferenceSession(model_bytes, sess_options=saving, providers=providers)


def _complete(entry: Path) -> bool:
    return (entry / MODEL_FILE).is_file() or (entry / REFUSED_FILE).is_file()


_PROBE_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.str_,
}


def _refusal(
    written: ort.InferenceSession, saved: Path, options: ort.SessionOptions, providers: list[str]
) -> str | None:
    """Why the saved copy cannot stand in for the session that wrote it (it does not load, or answers a probe
    differently), or None. A model the probe cannot run (inputs it cannot make, values it refuses) is only
    checked to load."""
    loading = _copy_options(options)
    loading.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        copy = ort.InferenceSession(str(saved), sess_options=loading, providers=providers)
    except Exception as err:  # noqa: BLE001 - ORT raises its own exception types
        return f"the optimised copy does not load: {type(err).__name__}: {err}"
    probe = _probe(written)
    if probe is None:
        return None
    try:
        expected = written.run(None, probe)
    except Exception:  # noqa: BLE001 - the model refuses the probe's values: nothing to compare
        return None
    try:
        answered = copy.run(None, probe)
    except Exception as err:  # noqa: BLE001 - the model answers the probe, its copy must too
        return f"the optimised copy fails a probe the model answers: {type(err).__name__}: {err}"
    for output, want, got in zip(written.get_outputs(), expected, answered, strict=True):
        same = (
            isinstance(want, np.ndarray)
            and isinstance(got, np.ndarray)
            and want.dtype == got.dtype
            and want.shape == got.shape
            and want.tobytes() == got.tobytes()
        ) or (not isinstance(want, np.ndarray) and want == got)
        if not same:
            return f"the optimised copy answers a probe differently from the model (output {output.name!r})"
    return None


def _probe(session: ort.InferenceSession) -> dict[str, np.ndarray] | None:
    """Two rows of seeded inputs for the session (symbolic dimensions 2), or None for inputs it cannot make."""
    rng = np.random.default_rng(0)
    probe = {}
    for spec in session.get_inputs():
        dtype = _PROBE_TYPES.get(spec.type)
        if dtype is None:
            return None
        shape = tuple(dim if isinstance(dim, int) and dim > 0 else 2 for dim in spec.shape)
        if dtype is np.str_:
            probe[spec.name] = np.full(shape, "a", dtype=object)
        elif np.issubdtype(dtype, np.floating):
            probe[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:  # integers and booleans: zeros, a valid index or category for most models
            probe[spec.name] = np.zeros(shape, dtype=dtype)
    return probe


def _copy_options(options: ort.SessionOptions) -> ort.SessionOptions:
    """Fresh options with the settings OnnxSession sets (SessionOptions cannot be copied)."""
    copy = ort.SessionOptions()
    copy.graph_optimization_level = options.graph_optimization_level
    copy.intra_op_num_threads = options.intra_op_num_threads
    copy.inter_op_num_threads = options.inter_op_num_threads
    copy.execution_mode = options.execution_mode
    copy.log_severity_level = options.log_severity_level
    return copy
