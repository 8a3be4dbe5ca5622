"""Model load time: a ~10 MB ONNX model copied into a running predictor's repository, then loaded with
RepositoryModelLoad (which returns once the model is loaded and warmed up), unloaded, and loaded again."""

from __future__ import annotations

import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench.predictor.protocol import load_model, probe_ready, unload_model
from bench.predictor.spec import BIG_MODEL_NAME


@dataclass
class LoadTimes:
    """Seconds of each RepositoryModelLoad of the big model, and their median."""

    model_bytes: int
    seconds: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None


def time_loads(address: str, repository: Path, big_model_dir: Path, model_bytes: int, repeats: int) -> LoadTimes:
    """Copy the big model into `repository`, then load and unload it `repeats` times over gRPC."""
    times = LoadTimes(model_bytes)
    shutil.copytree(big_model_dir, repository / BIG_MODEL_NAME)
    try:
        for attempt in range(repeats):
            if attempt:
                unload_model(address, BIG_MODEL_NAME)
            times.seconds.append(load_model(address, BIG_MODEL_NAME))
            if not probe_ready(address, BIG_MODEL_NAME, health=False).ready:
                times.error = f"{BIG_MODEL_NAME} not ready after RepositoryModelLoad returned"
                break
    except grpc.RpcError as err:
        times.error = f"{err.code().name}: {err.details()}"
    return times
