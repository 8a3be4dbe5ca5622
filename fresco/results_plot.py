"""`fresco experiments results --plot`: a metric's relative lift over time with its always-valid confidence
sequence, one line and band per treatment arm, a zero line and the minimum detectable effect, drawn with
matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.api.experiments.v1 import experiment_service_pb2 as spb

DPI = 100
SIZE_INCHES = (10.0, 5.5)


def plot_history(
    points: Sequence[spb.HistoryPoint],
    path: Path,
    title: str,
    minimum_detectable_effect: float = 0.0,
    direction: int = xpb.METRIC_DIRECTION_INCREASE,
) -> int:
    """Draw the lift history into a PNG at `path`; the number of treatment arms drawn. ValueError without points."""
    if not points:
        raise ValueError("no results history yet: nothing to plot")
    by_arm: dict[str, list[spb.HistoryPoint]] = defaultdict(list)
    for point in points:
        by_arm[point.arm_name].append(point)
    figure = Figure(figsize=SIZE_INCHES, dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for arm, series in sorted(by_arm.items()):
        series.sort(key=lambda p: (p.at.seconds, p.at.nanos))
        # datetime64 is naive UTC, which is what the axis shows.
        times = np.array([p.at.seconds * 1000 + p.at.nanos // 1_000_000 for p in series], dtype="datetime64[ms]")
        lifts = [p.relative_lift for p in series]
        lower = [p.sequential_interval.lower for p in series]
        upper = [p.sequential_interval.upper for p in series]
        (line,) = axes.plot(times, lifts, marker="o", markersize=3, label=f"{arm}: lift")
        axes.fill_between(times, lower, upper, alpha=0.2, color=line.get_color(), label=f"{arm}: confidence sequence")
    axes.axhline(0.0, color="black", linewidth=1.0, label="no effect")
    if minimum_detectable_effect:
        # A lower-is-better metric improves with a negative lift: its MDE line sits below zero.
        mde = -minimum_detectable_effect if direction == xpb.METRIC_DIRECTION_DECREASE else minimum_detectable_effect
        axes.axhline(mde, color="grey", linestyle="--", linewidth=1.0, label=f"MDE {mde * 100:+.3g}%")
    axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    # Concise labels read well from a few seconds of data (tests, demos) to weeks.
    locator = AutoDateLocator()  # type: ignore[no-untyped-call]  # matplotlib.dates has no annotations
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
    axes.set_xlabel("time (UTC)")
    axes.set_ylabel("relative lift vs control")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return len(by_arm)
