"""How `fresco models monitor` shows a model's live health: per version, a table per feature and score with its
drift (PSI/KS/JS per window), null rate against training, parity, and sparklines of the last day's PSI and null
rate; breaches in red. Plain functions of proto messages, tested without a server."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import monitoring_pb2 as mpb
from fresco.rollout_view import stage_name

BLOCKS = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 48  # columns a day's 289 buckets are folded into (the largest value of each group shown)
WINDOWS = ("5m", "1h", "1d")
POLICY_WINDOW = "1h"
_PSI = mpb.DRIFT_STATISTIC_PSI
_KS = mpb.DRIFT_STATISTIC_KS
_JS = mpb.DRIFT_STATISTIC_JS
_NULL = mpb.DRIFT_STATISTIC_NULL_RATE


def sparkline(values: Sequence[float], top: float, width: int = SPARK_WIDTH) -> str:
    """Unicode blocks from 0 to `top` (higher values are full blocks); a blank where every value is NaN."""
    if not values:
        return ""
    groups = max(1, math.ceil(len(values) / width))
    out = []
    for i in range(0, len(values), groups):
        seen = [v for v in values[i : i + groups] if not math.isnan(v)]
        if not seen:
            out.append(" ")
            continue
        share = min(max(max(seen) / top, 0.0), 1.0) if top > 0 else 0.0
        out.append(BLOCKS[min(int(share * len(BLOCKS)), len(BLOCKS) - 1)])
    return "".join(out)


def _measure(window: mpb.FeatureDriftWindow, statistic: int) -> mpb.DriftMeasure | None:
    return next((m for m in window.measures if m.statistic == statistic), None)


def drift_cell(window: mpb.FeatureDriftWindow) -> Text:
    """ "PSI/KS/JS" of one window; red when drifted, dim when the window was not judged, "—" without values."""
    if window.count == 0:
        return Text("—", style="dim")
    parts = []
    for statistic in (_PSI, _KS, _JS):
        m = _measure(window, statistic)
        parts.append("–" if m is None else f"{m.value:.3f}")
    style = "bold red" if window.drifted else ("" if window.judged else "dim")
    return Text("/".join(parts) + ("" if window.judged else "*"), style=style)


def null_cell(window: mpb.FeatureDriftWindow) -> Text:
    """The served null rate against training's; red when its rise is over the limit."""
    if window.count == 0:
        return Text("—", style="dim")
    rise = _measure(window, _NULL)
    style = "bold red" if rise is not None and rise.breached else ""
    return Text(f"{window.null_rate:.1%} ({window.training_null_rate:.1%})", style=style)


def parity_cell(feature: mpb.FeatureMonitor) -> Text:
    """Sampled served values checked against the offline path, and how many differed."""
    if not feature.HasField("parity") or feature.parity.checked == 0:
        return Text("—", style="dim")
    p = feature.parity
    return Text(f"{p.checked}/{p.mismatched}", style="bold red" if p.mismatched else "green")


def _policy_line(version: mpb.VersionMonitor) -> str:
    d = version.policy.defaults
    return (
        f"limits: PSI ≤ {d.max_psi:g}, KS ≤ {d.max_ks:g}, JS ≤ {d.max_js:g}, null-rate rise ≤ "
        f"{d.max_null_rate_increase:g}, out of range ≤ {d.max_out_of_range_rate:g}; judged from "
        f"{version.policy.min_rows} values (* not judged)"
    )


def version_table(model: str, version: mpb.VersionMonitor) -> RenderableType:
    """One version's features and scores: the windows, then the last day's history (a table of its own, so the
    sparklines keep their width in a terminal of 120 columns)."""
    title = f"{escape(model)} v{version.version} ({stage_name(version.stage)})"
    table = Table(title=title, title_justify="left", caption=_policy_line(version), caption_justify="left")
    history = Table(title="last day, oldest first", title_justify="left")
    for t in (table, history):
        t.add_column("feature", no_wrap=True)
        t.add_column("kind")
    for window in WINDOWS:
        table.add_column(f"{window} PSI/KS/JS", justify="right", no_wrap=True)
    table.add_column(f"null {POLICY_WINDOW} (training)", justify="right", no_wrap=True)
    table.add_column(f"values {POLICY_WINDOW}", justify="right")
    table.add_column("parity checked/mismatched", justify="right")
    history.add_column("PSI per 5 minutes", no_wrap=True)
    history.add_column("null rate per 5 minutes", no_wrap=True)
    for feature in version.features:
        windows = {w.window: w for w in feature.windows}
        hour = windows.get(POLICY_WINDOW, mpb.FeatureDriftWindow())
        limit = _measure(hour, _PSI)
        top = 2 * limit.threshold if limit is not None and limit.threshold > 0 else 0.2
        kind = "score" if feature.kind == mpb.VALUE_SKETCH_KIND_SCORE else "feature"
        drifted = feature.name in version.drifted_features
        name = Text(feature.name, style="bold red" if drifted else "")
        table.add_row(
            name,
            kind,
            *(drift_cell(windows.get(w, mpb.FeatureDriftWindow())) for w in WINDOWS),
            null_cell(hour),
            str(hour.count),
            parity_cell(feature),
        )
        history.add_row(
            name,
            kind,
            Text(sparkline(list(feature.psi_history), top), style="red" if drifted else "cyan"),
            Text(sparkline(list(feature.null_rate_history), 1.0), style="magenta"),
        )
    return Group(table, history)


def monitor_view(model: str, response: pb.GetModelMonitorResponse) -> RenderableType:
    """Every version, newest first, then the notes."""
    parts: list[RenderableType] = []
    if not response.versions:
        parts.append(Text(f"{model}: no version reported values in the last day", style="yellow"))
    for version in response.versions:
        parts.append(version_table(model, version))
        drifted = ", ".join(version.drifted_features)
        line = f"drifted ({POLICY_WINDOW}): {drifted}" if drifted else f"no drift over the limits ({POLICY_WINDOW})"
        parts.append(Text(line, style="bold red" if drifted else "green"))
    parts.extend(Text(f"note: {note}", style="yellow") for note in response.notes)
    return Group(*parts)
