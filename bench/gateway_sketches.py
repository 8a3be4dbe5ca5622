"""The cost of value sketches on the gateway's request path, in process: CPU time of the metric-window
work for one answered group (`MetricWindows.record` with what `RoutedCalls.observe` hands it: the
group's input tensors, one score per row, the predictions to keep), with sketches on and off, at
batch 1 (µs per request) and batch 64 (µs per row), windows closed as the reporter closes them.

    python -m bench.gateway_sketches [--features 32] [--rows 40000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from dataclasses import dataclass

import numpy as np

from gateway.assembly import InputSpec, ModelSignature
from gateway.metric_windows import MetricWindows, WindowKey
from gateway.window_sketches import Called
from model_manager.routes import MetricsConfig

WINDOW_ROWS = 10_000  # rows per window: 10 s at 1,000 predictions/s
KEY = WindowKey("bench", "1", 1)
METRICS = MetricsConfig()


@dataclass(frozen=True)
class Group:
    """One answered group as the pipeline hands it to the windows."""

    called: Called
    scores: list[float | None]
    predictions: list[tuple[str, str]]


def groups(features: int, batch: int, count: int, seed: int = 7) -> list[Group]:
    """`count` groups of `batch` rows of a model reading one FP32 vector of `features` named features."""
    rng = np.random.default_rng(seed)
    names = tuple(f"f{i:02d}" for i in range(features))
    signature = ModelSignature("bench", (InputSpec("input", "FP32", (-1, features), names),), ("probabilities",))
    made = []
    for _ in range(count):
        inputs = {"input": rng.normal(size=(batch, features)).astype(np.float32)}
        scores: list[float | None] = rng.random(batch).tolist()
        made.append(Group(Called(signature, inputs), scores, [(uuid.uuid4().hex, "") for _ in range(batch)]))
    return made


def cpu_per_row(made: list[Group], sketches: bool) -> float:
    """CPU seconds per row of recording every group (closing a window each WINDOW_ROWS rows)."""
    windows = MetricWindows("bench", value_sketches=sketches)
    rows = since_roll = 0
    started = time.process_time()
    for group in made:
        size = len(group.scores)
        windows.record(
            KEY, METRICS, "OK", 1.0, count=size, scores=group.scores, score_output="probabilities",
            score_bounds=(0.5,), called=group.called, predictions=group.predictions,
        )  # fmt: skip
        rows += size
        since_roll += size
        if since_roll >= WINDOW_ROWS:
            windows.roll()
            since_roll = 0
    windows.roll()
    return (time.process_time() - started) / rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--rows", type=int, default=40_000, help="rows recorded per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"value sketches on the request path: {args.features} FP32 features + 1 score, {args.rows} rows per run,")
    print(f"a window closed every {WINDOW_ROWS} rows, median CPU of {args.repeats} runs (time.process_time)")
    for batch, unit in ((1, "request"), (64, "row")):
        made = groups(args.features, batch, args.rows // batch)
        off, on = [], []
        for _ in range(args.repeats):  # interleaved: other load on the machine weighs on both alike
            off.append(cpu_per_row(made, sketches=False))
            on.append(cpu_per_row(made, sketches=True))
        low, high = statistics.median(off) * 1e6, statistics.median(on) * 1e6
        print(
            f"batch {batch:>2}: sketches off {low:.2f} µs/{unit}, on {high:.2f} µs/{unit}: "
            f"sketch cost {high - low:.2f} µs/{unit}"
        )


if __name__ == "__main__":
    main()
