"""What `fresco demo` does besides printing: send traffic through the gateway, summarise client-side
latencies, and check answers against onnxruntime run in process on the same rows."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from grpc import aio

from fresco.api.gateway.v1 import gateway_pb2 as pb
from fresco.client import AsyncGatewayClient, outputs, predict_request


@dataclass(frozen=True)
class Outcome:
    """One request: how long it took and its answer, or why it failed."""

    index: int
    latency_s: float
    response: pb.PredictResponse | None = None
    error: str = ""


@dataclass(frozen=True)
class Traffic:
    """Every request of a run, in request order, and the wall time of the whole run."""

    outcomes: list[Outcome]
    elapsed_s: float

    @property
    def answered(self) -> list[Outcome]:
        """The requests that got an answer."""
        return [o for o in self.outcomes if o.response is not None]

    @property
    def failed(self) -> list[Outcome]:
        """The requests that failed."""
        return [o for o in self.outcomes if o.response is None]

    @property
    def throughput(self) -> float:
        """Answered requests per second of wall time."""
        return len(self.answered) / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True)
class CheckReport:
    """How many answers were compared with the in-process reference, and how each differing one differed."""

    checked: int
    mismatches: list[str] = field(default_factory=list)


def request_rows(sample: np.ndarray, count: int) -> np.ndarray:
    """`count` rows cycling through `sample`, row i for request i."""
    return sample[np.arange(count) % len(sample)]


def row_features(feature_names: Sequence[str], row: np.ndarray) -> dict[str, float]:
    """One row as named double features."""
    return {name: float(value) for name, value in zip(feature_names, row.tolist(), strict=True)}


async def send_traffic(
    address: str,
    model: str,
    feature_names: Sequence[str],
    rows: np.ndarray,
    concurrency: int,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> Traffic:
    """One Predict per row through the gateway, at most `concurrency` in flight, each timed from send
    to answer; a failed request is recorded, never raised."""
    outcomes: list[Outcome | None] = [None] * len(rows)
    # One iterator shared by all workers: each takes the next index when it is free.
    indices = iter(range(len(rows)))
    async with AsyncGatewayClient(address) as client:

        async def worker() -> None:
            for index in indices:
                # Built before the clock starts: latency is the gateway's, not our proto building.
                request = predict_request(model, row_features(feature_names, rows[index]), request_id=str(index))
                start = time.perf_counter()
                try:
                    response = await client.send(request)
                    outcome = Outcome(index, time.perf_counter() - start, response)
                except aio.AioRpcError as err:
                    outcome = Outcome(index, time.perf_counter() - start, error=f"{err.code().name}: {err.details()}")
                outcomes[index] = outcome
                if on_outcome is not None:
                    on_outcome(outcome)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(rows))))))
        elapsed = time.perf_counter() - start
    return Traffic([o for o in outcomes if o is not None], elapsed)


def latency_percentiles_ms(latencies_s: Sequence[float], percents: Sequence[int] = (50, 90, 99)) -> dict[int, float]:
    """Latency percentiles in milliseconds, e.g. {50: 1.9, 90: 3.1, 99: 6.0}; empty without latencies."""
    if not latencies_s:
        return {}
    values = np.percentile(np.asarray(latencies_s, dtype=np.float64) * 1000.0, list(percents))
    return {p: float(v) for p, v in zip(percents, values.tolist(), strict=True)}


def reference_outputs(model_path: Path, input_name: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The model's outputs for `rows`, computed by onnxruntime in this process."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    results = session.run(names, {input_name: rows.astype(np.float32)})
    return dict(zip(names, results, strict=True))


def check_answers(
    traffic: Traffic,
    rows: np.ndarray,
    model_path: Path,
    input_name: str,
    limit: int,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> CheckReport:
    """Compare the first `limit` answers with onnxruntime in process on the same rows: float outputs
    within tolerance, every other output exactly, and each answer carrying its own request id."""
    answers = [(o.index, o.response) for o in traffic.outcomes[:limit] if o.response is not None]
    if not answers:
        return CheckReport(0)
    expected = reference_outputs(model_path, input_name, rows[[index for index, _ in answers]])
    mismatches: list[str] = []
    for position, (index, response) in enumerate(answers):
        problems = [] if response.request_id == str(index) else [f"answer carries request id {response.request_id!r}"]
        got = outputs(response)
        for name, batch in expected.items():
            want, have = batch[position], got.get(name)
            if have is None:
                problems.append(f"output {name!r} missing")
            elif not _same(have, want, rtol, atol):
                problems.append(f"{name} = {have.tolist()}, onnxruntime says {want.tolist()}")
        if problems:
            mismatches.append(f"request {index}: " + "; ".join(problems))
    return CheckReport(len(answers), mismatches)


def _same(have: np.ndarray, want: np.ndarray, rtol: float, atol: float) -> bool:
    if have.shape != want.shape:
        return False
    if want.dtype.kind == "f":
        return bool(np.allclose(have, want.astype(np.float64), rtol=rtol, atol=atol))
    return bool(np.array_equal(have, want))


def format_outputs(response: pb.PredictResponse) -> str:
    """An answer's outputs for people, e.g. `label=1  probabilities=[0.034, 0.966]`."""
    parts = []
    for name, array in sorted(outputs(response).items()):
        shown = np.round(array, 4).tolist() if array.dtype.kind == "f" else array.tolist()
        parts.append(f"{name}={shown}")
    return "  ".join(parts)
