"""ModelStatistics figures as Triton counts them: every request of a batch is charged the batch's
compute time, executions and batch figures count once per batch, inferences once per row."""

from __future__ import annotations

import asyncio

import numpy as np

from predictor.batcher import Execution, Request
from predictor.stats import VersionStats


def _request(rows: int) -> Request:
    future: asyncio.Future[dict[str, np.ndarray]] = asyncio.get_running_loop().create_future()
    return Request({}, rows, (), future, 0, None)


async def test_each_request_of_a_batch_is_charged_the_batch_compute_time() -> None:
    stats = VersionStats()
    # A batch of three requests (1 + 2 + 1 rows): 10 us joining inputs, 100 us in the model, 5 us slicing.
    stats.record_execution(Execution(4, [_request(1), _request(2), _request(1)], 115_000, False, 100_000, 10_000))
    # Then one request alone: 2 + 20 + 1 us.
    stats.record_execution(Execution(1, [_request(1)], 23_000, False, 20_000, 2_000))

    assert (stats.execution_count, stats.inference_count) == (2, 5)
    assert (stats.compute_input.count, stats.compute_input.ns) == (4, 3 * 10_000 + 2_000)
    assert (stats.compute_infer.count, stats.compute_infer.ns) == (4, 3 * 100_000 + 20_000)
    assert (stats.compute_output.count, stats.compute_output.ns) == (4, 3 * 5_000 + 1_000)
    # perf_analyzer's server-side compute per request: the average over requests.
    assert stats.compute_infer.ns // stats.compute_infer.count == (3 * 100_000 + 20_000) // 4
    # Batch figures: once per execution, at its size.
    assert {size: (f.compute_infer.count, f.compute_infer.ns) for size, f in stats.batches.items()} == {
        4: (1, 100_000),
        1: (1, 20_000),
    }
