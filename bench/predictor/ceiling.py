"""The in-process ceiling: ONNX Runtime's InferenceSession.run in a loop on the same model, one thread
and one intra-op thread, no network and no server. No server can serve more rows per second per core."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.predictor.spec import FEATURES, INPUT_NAME, OUTPUT_NAME


@dataclass(frozen=True)
class CeilingResult:
    """Rows per second of `session.run` at one batch size."""

    batch_size: int
    calls: int
    seconds: float
    rows_per_s: float
    us_per_call: float


def session(onnx_file: Path) -> ort.InferenceSession:
    """A CPU session with one intra-op and one inter-op thread, run sequentially."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])


def measure(onnx_file: Path, batch_sizes: list[int], seconds: float) -> list[CeilingResult]:
    """For each batch size: warm up, then call `run` for about `seconds`."""
    sess = session(onnx_file)
    rng = np.random.default_rng(0)
    results = []
    for batch in batch_sizes:
        feed = {INPUT_NAME: rng.standard_normal((batch, FEATURES)).astype(np.float32)}
        for _ in range(50):
            sess.run([OUTPUT_NAME], feed)
        calls = 0
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            for _ in range(100):
                sess.run([OUTPUT_NAME], feed)
            calls += 100
            now = time.perf_counter()
            if now >= deadline:
                break
        elapsed = now - start
        results.append(CeilingResult(batch, calls, elapsed, calls * batch / elapsed, elapsed / calls * 1e6))
    return results


def reference_outputs(onnx_file: Path, rows: np.ndarray) -> np.ndarray:
    """The model's answers for `rows`, computed in process (float64 [n])."""
    out = session(onnx_file).run([OUTPUT_NAME], {INPUT_NAME: rows.astype(np.float32)})[0]
    return np.asarray(out, dtype=np.float64).reshape(-1)
