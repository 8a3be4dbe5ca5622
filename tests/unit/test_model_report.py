"""The model report: data quality flags from training statistics, and the page parsed back for its sections, its
embedded images and its escaping, with every source present and with the live ones missing."""

from __future__ import annotations

import base64
import math
from html.parser import HTMLParser

import pytest

from fresco.api.features.v1 import statistics_pb2 as spb
from fresco.api.models.v1 import monitoring_pb2 as mpb
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.model_report import Fetched, build, feature_quality
from fresco.model_report_html import SECTIONS, render

PNG = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """The parts of a page the tests read: section ids, images, links and the text of each section."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[tuple[str, str]] = []  # (section, src)
        self.external: list[str] = []
        self.text: dict[str, str] = {}
        self.tags: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            self.sections.append(values["id"] or "")
        if tag == "img":
            self.images.append((self.sections[-1], values["src"] or ""))
        for name in ("src", "href"):
            link = values.get(name)
            if link is not None and not link.startswith("data:"):
                self.external.append(link)

    def handle_data(self, data: str) -> None:
        if self.sections:
            self.text[self.sections[-1]] = self.text.get(self.sections[-1], "") + data


def calibration(shift: float) -> rpb.Calibration:
    bins = [
        rpb.CalibrationBin(lower=i / 5, upper=(i + 1) / 5, mean_predicted=i / 5 + 0.1, observed_rate=i / 5 + shift,
                           count=100)
        for i in range(5)
    ]  # fmt: skip
    return rpb.Calibration(bins=bins, expected_calibration_error=abs(shift - 0.1), brier_score=0.2)


def version() -> rpb.ModelVersion:
    stats = [
        spb.FeatureStatistics(feature_name="<script>age</script>", count=1000, null_count=10, null_rate=0.01,
                              numeric=spb.NumericStatistics(min=18, max=90, mean=41)),
        spb.FeatureStatistics(feature_name="flat", count=1000, numeric=spb.NumericStatistics(min=3, max=3, mean=3)),
        spb.FeatureStatistics(feature_name="sparse", count=1000, null_count=700, null_rate=0.7,
                              numeric=spb.NumericStatistics(min=0, max=1, mean=0.5)),
        spb.FeatureStatistics(feature_name="plan", count=1000, categorical=spb.CategoricalStatistics(
            distinct_count=1, top_categories=[spb.CategoryCount(value="basic", count=1000, fraction=1.0)])),
        spb.FeatureStatistics(feature_name="user_id", count=1000, categorical=spb.CategoricalStatistics(
            distinct_count=990)),
    ]  # fmt: skip
    backtest = rpb.GateResult(
        name="backtest.auc.min_value",
        type=rpb.GATE_TYPE_BACKTEST,
        passed=True,
        backtest=rpb.BacktestReport(rows=400, metrics={"auc": 0.88}, baseline_version=1,
                                    baseline_metrics={"auc": 0.85}, calibration=calibration(0.12)),
    )  # fmt: skip
    return rpb.ModelVersion(
        model_name="churn",
        version=2,
        stage=rpb.MODEL_STAGE_PRODUCTION,
        training_statistics=stats,
        report=rpb.TrainingReport(
            metrics={"auc": 0.9},
            feature_importance={"<script>age</script>": 0.6, "flat": 0.1, "sparse": 0.3},
            calibration=calibration(0.1),
        ),
        gate_results=[backtest],
    )


def monitor() -> mpb.VersionMonitor:
    history = [0.01, 0.02, math.nan, 0.3]
    window = mpb.FeatureDriftWindow(
        window="1h", count=5000, null_rate=0.01, judged=True, drifted=True,
        measures=[mpb.DriftMeasure(statistic=mpb.DRIFT_STATISTIC_PSI, value=0.3, threshold=0.1, breached=True)],
    )  # fmt: skip
    return mpb.VersionMonitor(
        version=2,
        features=[mpb.FeatureMonitor(name="sparse", kind=mpb.VALUE_SKETCH_KIND_FEATURE, windows=[window],
                                     psi_history=history)],
        drifted_features=["sparse"],
    )  # fmt: skip


def quality() -> mpb.VersionQuality:
    window = mpb.QualityWindow(window="1d", predictions=900, labelled=800, metrics={"accuracy": 0.93},
                               calibration=calibration(0.08), mean_entropy=0.4)  # fmt: skip
    return mpb.VersionQuality(version=2, windows=[window])


def safety() -> mpb.SafetyScore:
    part = mpb.SafetyPart(name="shadow", score=0.5, covered=1, total=2, missing=["v2: reached production without"])
    return mpb.SafetyScore(model_name="churn", score=62.5, parts=[part])


def test_training_features_are_flagged() -> None:
    flags = {s.feature_name: feature_quality(s).flags for s in version().training_statistics}
    assert flags["<script>age</script>"] == ()
    assert flags["flat"] == ("constant (3)",)
    assert flags["sparse"] == ("mostly null (70%)",)
    assert flags["plan"] == ("constant (one category)",)
    assert flags["user_id"] == ("high cardinality (990 distinct of 1000)",)
    assert feature_quality(spb.FeatureStatistics(feature_name="e")).flags == ("empty: no non-null value",)


def test_the_page_has_every_section_its_plots_and_escapes_text() -> None:
    report = build("churn", version(), Fetched(quality()), Fetched(monitor()), Fetched(safety()))
    assert list(report.calibrations) == ["training", "backtest", "live (1d)"]
    assert [n for n, _ in report.importance] == ["<script>age</script>", "sparse", "flat"]
    html = render(report)
    page = Page(html)
    assert page.sections == [anchor for anchor, _ in SECTIONS]
    assert "script" not in page.tags
    assert "&lt;script&gt;age&lt;/script&gt;" in html
    assert page.external == []
    assert [section for section, _ in page.images] == ["feature-importance", "calibration", "drift"]
    for _, src in page.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix) :]).startswith(PNG)
    assert "mostly null (70%)" in page.text["data-quality"]
    assert "5 features, 4 flagged." in page.text["data-quality"]
    assert "0.88" in page.text["metrics"]
    assert "0.85" in page.text["metrics"]
    assert "0.93" in page.text["metrics"]
    assert "0.3 !" in page.text["drift"]
    assert "drifted: sparse" in page.text["drift"]
    assert "score 62 / 100" in page.text["safety"]
    assert "missing" not in html.split('id="metrics"')[1].split("</section>")[0]


def test_missing_sources_are_shown_as_missing_and_nothing_is_drawn_for_them() -> None:
    bare = rpb.ModelVersion(model_name="churn", version=1)
    absent = "drift monitor: UNIMPLEMENTED: Method not found!"
    report = build("churn", bare, Fetched(None), Fetched(None, absent), Fetched(None, "safety score: UNAVAILABLE: x"))
    page = Page(render(report))
    assert page.images == []
    assert "registered without training statistics" in page.text["data-quality"]
    assert "no feature importance" in page.text["feature-importance"]
    assert "no backtest report" in page.text["metrics"]
    assert "no labelled predictions for this version" in page.text["metrics"]
    assert "no calibration bins" in page.text["calibration"]
    assert page.text["drift"].startswith("Drift since release" + f"no live data ({absent})")
    assert "safety score: UNAVAILABLE" in page.text["safety"]


@pytest.mark.parametrize("history", [[], [math.nan, math.nan]])
def test_a_monitor_without_a_judged_bucket_says_no_live_data(history: list[float]) -> None:
    empty = mpb.VersionMonitor(version=1, features=[mpb.FeatureMonitor(name="f", psi_history=history)])
    report = build("churn", rpb.ModelVersion(version=1), Fetched(None), Fetched(empty), Fetched(safety()))
    page = Page(render(report))
    assert "no live data: no PSI history yet" in page.text["drift"]
    assert [section for section, _ in page.images if section == "drift"] == []
