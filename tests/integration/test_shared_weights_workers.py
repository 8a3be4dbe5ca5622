"""`--workers 2` with shared weights: both workers map the weights of one cache entry, answer alike
and exactly as ONNX Runtime in this process, and a worker restarted after a crash maps the same entry
(nothing is written again)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from fresco.api.inference import grpc_service_pb2_grpc as pb_grpc
from predictor.shared_weights import MODEL_FILE, WEIGHTS_FILE
from tests.integration import decode_outputs, infer_request
from tests.integration.test_workers import Supervisor, all_ready, channels, children_of, workers_args

pytestmark = pytest.mark.integration


def worker_pids(supervisor: Supervisor) -> set[int]:
    """The workers: forked from the zygote, the supervisor's child, so one level below its children."""
    assert supervisor.process is not None
    return {pid for child in children_of(supervisor.process.pid) for pid in children_of(child)}


def mapped_files(pid: int) -> set[str]:
    return {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "/" in line}


async def test_workers_map_one_entry_and_a_restarted_worker_reuses_it(
    repository, sample: np.ndarray, tmp_path: Path
) -> None:
    root, cache = tmp_path / "models", tmp_path / "shared-weights"
    shutil.copytree(repository.root / "demo", root / "demo")
    args = workers_args(root, "--shared-weights-min-bytes", "1", "--shared-weights-dir", str(cache))
    service = Supervisor("predictor", args, log_path=tmp_path / "predictor.log")
    opened = []
    try:
        service.start()
        service.wait_healthy()
        opened = channels(service.address)
        stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in opened]
        await all_ready(stubs, "demo")

        (entry,) = [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]
        assert {p.name for p in entry.iterdir()} == {MODEL_FILE, WEIGHTS_FILE}
        written = (entry / WEIGHTS_FILE).stat().st_mtime_ns
        workers = worker_pids(service)
        assert len(workers) == 2
        assert all(str(entry / WEIGHTS_FILE) in mapped_files(pid) for pid in workers)

        import onnxruntime as ort

        direct = ort.InferenceSession(
            (repository.root / "demo" / "1" / "model.onnx").read_bytes(), providers=["CPUExecutionProvider"]
        )

        async def check_everywhere() -> None:
            rows = sample[:5]
            label, probabilities = direct.run(["label", "probabilities"], {"X": rows})
            for stub in stubs:
                outputs = decode_outputs(await stub.ModelInfer(infer_request(rows), timeout=30))
                np.testing.assert_array_equal(outputs["label"], label, strict=True)
                np.testing.assert_array_equal(outputs["probabilities"], probabilities, strict=True)

        await check_everywhere()

        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len(worker_pids(service) - {victim}) < 2:
            assert time.monotonic() < deadline, "the supervisor did not restart the killed worker"
            await asyncio.sleep(0.2)
        (replacement,) = worker_pids(service) - workers
        while str(entry / WEIGHTS_FILE) not in mapped_files(replacement):  # until it has loaded demo
            assert time.monotonic() < deadline, "the restarted worker did not map the entry's weights"
            await asyncio.sleep(0.2)
        assert (entry / WEIGHTS_FILE).stat().st_mtime_ns == written
        assert [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")] == [entry]
        for channel in opened:
            await channel.close()
        opened = channels(service.address)  # new connections, some of them to the new worker
        stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in opened]
        await all_ready(stubs, "demo")
        await check_everywhere()
    finally:
        for channel in opened:
            await channel.close()
        service.stop()
