"""The model report as one self-contained HTML page: every text escaped, every plot a base64 PNG drawn with
matplotlib's Agg canvas (no display, no pyplot state), no external asset."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from html import escape

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fresco.api.models.v1 import monitoring_pb2 as mpb
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.model_report import ModelReport, psi_series

DPI = 90
SECTIONS = (
    ("data-quality", "Data quality of the training set"),
    ("feature-importance", "Feature importance"),
    ("metrics", "Metrics"),
    ("calibration", "Calibration"),
    ("drift", "Drift since release"),
    ("safety", "Safety score of the family"),
)
STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:.5em 0}"
    "td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}.missing{color:#a33}.flag{color:#b60}"
)
DRIFT_STATISTICS = {
    mpb.DRIFT_STATISTIC_PSI: "PSI",
    mpb.DRIFT_STATISTIC_KS: "KS",
    mpb.DRIFT_STATISTIC_JS: "JS",
    mpb.DRIFT_STATISTIC_NULL_RATE: "null rate +",
    mpb.DRIFT_STATISTIC_OUT_OF_RANGE: "out of range",
}


def render(report: ModelReport) -> str:
    """The whole page."""
    v = report.version
    title = f"Model report: {report.model_name} version {v.version}"
    body = [
        f"<h1>{escape(title)}</h1>",
        f"<p>stage {escape(rpb.ModelStage.Name(v.stage).removeprefix('MODEL_STAGE_').lower())}, "
        f"sha256 {escape(v.sha256[:12])}, code commit {escape(v.lineage.code_commit or '-')}</p>",
    ]
    renderers = (_data_quality, _importance, _metrics, _calibration, _drift, _safety)
    for (anchor, heading), section in zip(SECTIONS, renderers, strict=True):
        body.append(f'<section id="{anchor}"><h2>{escape(heading)}</h2>{"".join(section(report))}</section>')
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>"
    )


def _missing(text: str) -> str:
    return f'<p class="missing">{escape(text)}</p>'


def _table(head: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    cells = "".join(f"<th>{escape(h)}</th>" for h in head)
    lines = "".join("<tr>" + "".join(f"<td>{escape(_text(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{lines}</table>"


def _text(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _image(figure: Figure, alt: str) -> str:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=DPI)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _figure(width: float = 7.0, height: float = 3.5) -> Figure:
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _data_quality(report: ModelReport) -> list[str]:
    if not report.data_quality:
        return [_missing("missing: the version was registered without training statistics")]
    flagged = sum(1 for f in report.data_quality if f.flags)
    rows = [
        (f.name, f.kind, f.count, f"{f.null_rate:.2%}", f.minimum, f.maximum, f.mean, f.distinct, f.top,
         "; ".join(f.flags) or "ok")
        for f in report.data_quality
    ]  # fmt: skip
    head = ("feature", "kind", "count", "null rate", "min", "max", "mean", "distinct", "top", "flags")
    return [f"<p>{len(report.data_quality)} features, {flagged} flagged.</p>", _table(head, rows)]


def _importance(report: ModelReport) -> list[str]:
    if not report.importance:
        return [_missing("missing: the training report holds no feature importance")]
    figure = _figure(7.0, max(2.0, 0.35 * len(report.importance) + 1.0))
    axes = figure.add_subplot()
    names = [n for n, _ in report.importance][::-1]
    axes.barh(names, [x for _, x in report.importance][::-1], color="#4c72b0")
    axes.set_xlabel("importance")
    return [_image(figure, "feature importance"), _table(("feature", "importance"), report.importance)]


def _metrics(report: ModelReport) -> list[str]:
    out = ["<h3>Training</h3>"]
    metrics = report.version.report.metrics
    out.append(_table(("metric", "value"), sorted(metrics.items())) if metrics else _missing("missing: no metrics"))
    out.append("<h3>Backtest (promotion gate)</h3>")
    b = report.backtest
    if b is None:
        out.append(_missing("missing: no backtest report among the version's gate results"))
    else:
        out.append(f"<p>{b.rows} rows of {escape(b.dataset_uri)} (sha256 {escape(b.dataset_sha256[:12])})</p>")
        names = sorted(set(b.metrics) | set(b.baseline_metrics))
        baseline = f"baseline v{b.baseline_version}" if b.baseline_version else "baseline"
        rows: list[tuple[object, ...]] = [(n, b.metrics.get(n), b.baseline_metrics.get(n)) for n in names]
        out.append(_table(("metric", "candidate", baseline), rows))
    out.append("<h3>Live (late labels)</h3>")
    quality = report.quality.value
    if quality is None:
        out.append(_missing(f"missing: {report.quality.missing}"))
    else:
        names = sorted({n for w in quality.windows for n in w.metrics})
        rows = [
            (w.window, w.predictions, w.labelled, *(w.metrics.get(n) for n in names),
             w.mean_entropy if w.HasField("mean_entropy") else None)
            for w in quality.windows
        ]  # fmt: skip
        out.append(_table(("window", "predictions", "labelled", *names, "mean entropy"), rows))
    return out


def _calibration(report: ModelReport) -> list[str]:
    out = []
    if not report.calibrations:
        return [_missing("missing: no calibration bins in the training report, the backtest or live quality")]
    if report.quality.value is None:
        out.append(_missing(f"live calibration missing: {report.quality.missing}"))
    figure = _figure(5.0, 5.0)
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect")
    for name, calibration in report.calibrations.items():
        bins = [b for b in calibration.bins if b.count > 0]
        axes.plot([b.mean_predicted for b in bins], [b.observed_rate for b in bins], marker="o", label=name)
    axes.set_xlabel("mean predicted probability")
    axes.set_ylabel("observed positive rate")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.legend(loc="upper left", fontsize="small")
    out.append(_image(figure, "calibration"))
    rows = [(n, c.expected_calibration_error, c.brier_score, sum(b.count for b in c.bins))
            for n, c in report.calibrations.items()]  # fmt: skip
    out.append(_table(("source", "expected calibration error", "brier score", "rows"), rows))
    return out


def _drift(report: ModelReport) -> list[str]:
    monitor = report.monitor.value
    if monitor is None:
        return [_missing(f"no live data ({report.monitor.missing})")]
    out = []
    series = psi_series(monitor)
    if series:
        figure = _figure()
        axes = figure.add_subplot()
        for name, history in series:
            values = np.array([x if math.isfinite(x) else np.nan for x in history], dtype=float)
            axes.plot(np.arange(len(values)) * 5.0 / 60.0, values, label=name)
        limit = monitor.policy.defaults.max_psi if monitor.policy.defaults.HasField("max_psi") else 0.1
        axes.axhline(limit, color="red", linestyle="--", linewidth=1.0, label=f"PSI limit {limit:g}")
        axes.set_xlabel("hours (5-minute buckets, oldest first)")
        axes.set_ylabel("PSI")
        axes.legend(loc="upper left", fontsize="small")
        out.append(_image(figure, "PSI history per feature"))
    else:
        out.append(_missing("no live data: no PSI history yet"))
    drifted = ", ".join(monitor.drifted_features) or "none"
    out.append(f"<p>drifted: {escape(drifted)}</p>")
    rows = []
    for feature in monitor.features:
        for w in feature.windows:
            measures = _measures(w.measures)
            rows.append((feature.name, w.window, w.count, f"{w.null_rate:.2%}", *measures, "yes" if w.drifted else "no",
                         w.note))  # fmt: skip
    if rows:
        head = ("feature", "window", "values", "null rate", *DRIFT_STATISTICS.values(), "drifted", "note")
        out.append(_table(head, rows))
    return out


def _measures(measures: Iterable[mpb.DriftMeasure]) -> list[object]:
    by: Mapping[int, mpb.DriftMeasure] = {m.statistic: m for m in measures}
    return [f"{by[s].value:.3g}{' !' if by[s].breached else ''}" if s in by else None for s in DRIFT_STATISTICS]


def _safety(report: ModelReport) -> list[str]:
    score = report.safety.value
    if score is None:
        return [_missing(f"missing: {report.safety.missing}")]
    rows = [(p.name, f"{p.score:.0%}", f"{p.covered}/{p.total}", "\n".join(p.missing) or "-") for p in score.parts]
    return [f"<p>score {score.score:.0f} / 100</p>", _table(("part", "score", "covered", "missing"), rows)]
