"""How the CLI shows experiments, their results and the lift plot, on real proto messages."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from PIL import Image
from rich.console import Console, RenderableType

from fresco.api.common.v1 import values_pb2
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.api.experiments.v1 import experiment_service_pb2 as spb
from fresco.api.experiments.v1 import results_pb2 as rpb
from fresco.experiments_view import (
    condition_text,
    criterion_text,
    decision_record_text,
    experiment_summary,
    experiment_view,
    experiments_table,
    interval_text,
    percent,
)
from fresco.results_plot import plot_history
from fresco.results_view import check_value_text, results_view, srm_line

T0 = 1_790_000_000  # 2026-09-21 14:13:20 UTC
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def at(offset: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=T0 + offset)


def text(renderable: RenderableType) -> str:
    console = Console(file=io.StringIO(), width=220, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def experiment() -> xpb.Experiment:
    return xpb.Experiment(
        key="ranker-v2",
        hypothesis="v2 ranks better",
        owner="search",
        type=xpb.EXPERIMENT_TYPE_AB_TEST,
        model_name="ranker",
        arms=[
            xpb.Arm(name="control", weight=0.9, model_version=1, description="serving"),
            xpb.Arm(name="treatment", weight=0.1, model_version=2, parameters={"depth": "8"}),
        ],
        control_arm="control",
        unit_type="user_id",
        coverage=0.5,
        targeting=[
            xpb.TargetingCondition(
                attribute="country",
                operator=xpb.CONDITION_OPERATOR_IN,
                values=[values_pb2.Value(string_value="FR"), values_pb2.Value(string_value="DE")],
            )
        ],
        namespace=xpb.Namespace(id="ranking", start=0, end=5000),
        metrics=[
            xpb.MetricSpec(
                name="accuracy",
                role=xpb.METRIC_ROLE_SUCCESS,
                kind=xpb.METRIC_KIND_PROPORTION,
                minimum_detectable_effect=0.02,
                cuped=xpb.Cuped(
                    covariate_event="past_accuracy", pre_exposure_window=duration_pb2.Duration(seconds=604800)
                ),
            ),
            xpb.MetricSpec(
                name="latency_ms",
                role=xpb.METRIC_ROLE_LATENCY,
                kind=xpb.METRIC_KIND_MEAN,
                direction=xpb.METRIC_DIRECTION_DECREASE,
                non_inferiority_margin=0.1,
                cap=2000,
            ),
        ],
        min_units_per_arm=10_000,
        max_duration=duration_pb2.Duration(seconds=14 * 86400),
        decision_rule=xpb.DecisionRule(
            criteria=[
                xpb.Criterion(kind=xpb.CRITERION_KIND_MIN_LIFT, metric="accuracy", threshold=0.02),
                xpb.Criterion(kind=xpb.CRITERION_KIND_MAX_REGRESSION, metric="latency_ms", threshold=0.1),
                xpb.Criterion(kind=xpb.CRITERION_KIND_MIN_UNITS),
            ]
        ),
        statistics=xpb.StatisticsSettings(alpha=0.05, power=0.8),
        labels={"team": "search"},
        status=xpb.EXPERIMENT_STATUS_STOPPED,
        version=4,
        phases=[
            xpb.Phase(number=1, started_at=at(0), ended_at=at(600), weights=[0.5, 0.5], experiment_version=2),
            xpb.Phase(number=2, started_at=at(600), weights=[0.9, 0.1], experiment_version=3),
        ],
        created_at=at(-60),
        updated_at=at(7200),
        updated_by="alice",
        started_at=at(0),
        stopped_at=at(7200),
        stop_reason="enough data",
    )


def results() -> rpb.ExperimentResults:
    accuracy = rpb.MetricResult(
        metric_name="accuracy",
        role=xpb.METRIC_ROLE_SUCCESS,
        kind=xpb.METRIC_KIND_PROPORTION,
        direction=xpb.METRIC_DIRECTION_INCREASE,
        arms=[
            rpb.MetricSummary(arm_name="control", units=90_210, mean=0.8123, adjusted_mean=0.8125),
            rpb.MetricSummary(
                arm_name="treatment", units=10_034, mean=0.8391, adjusted_mean=0.8402, units_with_covariate=7_712
            ),
        ],
        comparisons=[
            rpb.Comparison(
                arm_name="treatment",
                absolute_effect=0.0277,
                relative_lift=0.0341,
                p_value=0.00012,
                interval=rpb.Interval(lower=0.0211, upper=0.0471),
                sequential_p_value=0.0043,
                sequential_interval=rpb.Interval(lower=0.0102, upper=0.0580),
                significant=True,
                cuped_applied=True,
                variance_reduction=0.372,
                probability_to_beat_control=0.9991,
            )
        ],
        power=rpb.PowerPlan(minimum_detectable_effect=0.02, required_units_per_arm=9_812, achieved_power=0.871),
    )
    latency = rpb.MetricResult(
        metric_name="latency_ms",
        role=xpb.METRIC_ROLE_LATENCY,
        kind=xpb.METRIC_KIND_MEAN,
        direction=xpb.METRIC_DIRECTION_DECREASE,
        arms=[
            rpb.MetricSummary(arm_name="control", units=90_210, mean=41.7, adjusted_mean=41.7),
            rpb.MetricSummary(arm_name="treatment", units=10_034, mean=43.9, adjusted_mean=43.9),
        ],
        comparisons=[
            rpb.Comparison(
                arm_name="treatment",
                relative_lift=0.0528,
                p_value=0.31,
                interval=rpb.Interval(lower=-0.021, upper=0.1266),
                sequential_p_value=0.77,
                sequential_interval=rpb.Interval(lower=-0.061, upper=0.1666),
                non_inferior=False,
                probability_to_beat_control=0.16,
            )
        ],
    )
    return rpb.ExperimentResults(
        experiment_key="ranker-v2",
        experiment_version=4,
        phase=2,
        computed_at=at(7300),
        control_arm="control",
        arms=[
            rpb.ArmResult(arm_name="control", units=90_210, weight=0.9, model_version=1, probability_best=0.0009),
            rpb.ArmResult(arm_name="treatment", units=10_034, weight=0.1, model_version=2, probability_best=0.9991),
        ],
        metrics=[accuracy, latency],
        sample_ratio=rpb.SampleRatioCheck(
            chi_square=1.82,
            p_value=0.177,
            max_relative_deviation=0.0124,
            mismatch=False,
            arms=[
                rpb.ArmCount(arm_name="control", expected_units=90_219.6, observed_units=90_210),
                rpb.ArmCount(arm_name="treatment", expected_units=10_024.4, observed_units=10_034),
            ],
        ),
        decision=rpb.Decision(
            action=xpb.DECISION_ACTION_KEEP_CONTROL,
            reason="treatment fails max_regression latency_ms",
            checks=[
                rpb.DecisionCheck(
                    arm_name="treatment",
                    criterion=xpb.Criterion(kind=xpb.CRITERION_KIND_MIN_LIFT, metric="accuracy", threshold=0.02),
                    value=0.0341,
                    threshold=0.02,
                    passed=True,
                    detail="significant lift",
                ),
                rpb.DecisionCheck(
                    arm_name="treatment",
                    criterion=xpb.Criterion(kind=xpb.CRITERION_KIND_MAX_REGRESSION, metric="latency_ms", threshold=0.1),
                    value=0.1666,
                    threshold=0.1,
                    passed=False,
                    conclusive=True,
                    detail="bad end of the interval beyond the margin",
                ),
                rpb.DecisionCheck(
                    arm_name="treatment",
                    criterion=xpb.Criterion(kind=xpb.CRITERION_KIND_MIN_UNITS),
                    value=10_034,
                    threshold=10_000,
                    passed=True,
                ),
                rpb.DecisionCheck(
                    arm_name="treatment",
                    criterion=xpb.Criterion(kind=xpb.CRITERION_KIND_NO_SAMPLE_RATIO_MISMATCH),
                    value=0.177,
                    threshold=0.001,
                    passed=True,
                ),
            ],
        ),
        running_for_seconds=6700.4,
    )


def row(shown: str, starts: str) -> str:
    """The first table row that, its cells joined by " | ", starts with `starts` (rich draws cells between │)."""
    for line in shown.splitlines():
        if "│" not in line:
            continue
        joined = " | ".join(c.strip() for c in line.strip().strip("│").split("│"))
        if joined.startswith(starts):
            return joined
    raise AssertionError(f"no row starting {starts!r} in:\n{shown}")


def test_numbers_read_as_percentages_and_intervals() -> None:
    assert [percent(0.0341), percent(-0.021), percent(0.1, signed=False), percent(float("nan"))] == [
        "+3.41%",
        "-2.10%",
        "10.00%",
        "n/a",
    ]
    assert interval_text(rpb.Interval(lower=-0.061, upper=0.1666)) == "[-6.10%, +16.66%]"


def test_the_results_show_arms_metrics_comparisons_srm_and_every_decision_check() -> None:
    shown = text(results_view(results()))
    assert "ranker-v2 · version 4 · phase 2 · running 1h51m40s · computed 2026-09-21 16:15:00 UTC" in shown
    assert row(shown, "control (control)").startswith("control (control) | v1 | 90,210 | 90.00% | 0.09%")
    assert row(shown, "treatment | v2").startswith("treatment | v2 | 10,034 | 10.00% | 99.91%")
    assert "accuracy (success, proportion, higher is better)" in shown
    assert "latency_ms (latency, mean, lower is better)" in shown
    accuracy = shown[shown.index("accuracy (success") : shown.index("latency_ms (latency")]
    treatment = row(accuracy, "treatment")
    for expected in (
        "10,034",
        "0.8402 (raw 0.8391)",
        "+3.41%",
        "[+2.11%, +4.71%]",
        "[+1.02%, +5.80%]",
        "1.2e-04",
        "0.0043",
        "99.91%",
        "significant",
        "CUPED: variance -37.2%, 7,712/10,034 units with prior data",
    ):
        assert expected in treatment, (expected, treatment)
    assert row(accuracy, "control (control)").startswith("control (control) | 90,210 | 0.8125 (raw 0.8123) | -")
    assert "MDE +2.00%: 9,812 units per arm for the planned power; power now 87.10%" in shown
    latency = row(shown[shown.index("latency_ms (latency") :], "treatment")
    for expected in ("+5.28%", "[-2.10%, +12.66%]", "[-6.10%, +16.66%]", "0.31", "0.77", "not significant"):
        assert expected in latency, (expected, latency)
    assert "not non-inferior" in latency
    assert "CUPED" not in latency
    assert (
        "sample ratio: ok (χ² 1.82, p 0.177, max deviation 1.24%; observed/expected units: control 90,210/90,220, "
        "treatment 10,034/10,024)" in " ".join(shown.split())
    )
    assert "decision: KEEP_CONTROL: treatment fails max_regression latency_ms" in shown
    assert row(shown, "treatment | min_lift").startswith(
        "treatment | min_lift accuracy >= +2.00% | +3.41% | +2.00% | pass"
    )
    regression = row(shown, "treatment | max_regression")
    assert regression.startswith(
        "treatment | max_regression latency_ms <= 10.00% | 16.66% | 10.00% | FAIL (conclusive)"
    )
    assert "bad end of the interval beyond the margin" in regression
    assert row(shown, "treatment | min_units").startswith(
        "treatment | min_units (the experiment's minimum) | 10,034 | 10,000 | pass"
    )
    assert row(shown, "treatment | no_sample").startswith("treatment | no_sample_ratio_mismatch | 0.177 | 0.001 | pass")


def test_a_mismatch_and_tiny_p_values_are_shown() -> None:
    check = rpb.SampleRatioCheck(chi_square=812.5, p_value=3.2e-12, max_relative_deviation=0.31, mismatch=True)
    assert srm_line(check) == (
        "sample ratio: [red]MISMATCH[/red] (χ² 812.5, p 3.2e-12, max deviation 31.00%; observed/expected units: none)"
    )
    srm = rpb.DecisionCheck(criterion=xpb.Criterion(kind=xpb.CRITERION_KIND_NO_SAMPLE_RATIO_MISMATCH), value=3.2e-12)
    assert check_value_text(srm) == ("3.2e-12", "0")


def test_experiment_view_shows_configuration_phases_status_and_audit() -> None:
    audit = [
        spb.AuditEntry(version=1, action="create", identity="alice", at=at(-60), detail="created"),
        spb.AuditEntry(version=3, action="update", identity="bob", at=at(600), detail="arms: weights 0.9, 0.1"),
    ]
    shown = text(experiment_view(experiment(), audit))
    for expected in (
        "status             STOPPED",
        "experiment         ranker-v2 · version 4",
        "hypothesis         v2 ranks better",
        "coverage           50.00%",
        "namespace          ranking [0, 5000)",
        "targeting          country in ('FR', 'DE')",
        "min units per arm  10,000",
        "max duration       14d",
        "statistics         alpha 0.05, power 0.8, always-valid (sequential)",
        "labels             team=search",
        "updated            2026-09-21 16:13:20 by alice",
        "stopped            2026-09-21 16:13:20: enough data",
    ):
        assert expected in shown, expected
    assert row(shown, "control (control)") == "control (control) | v1 | 90.00% | - | serving"
    assert row(shown, "treatment") == "treatment | v2 | 10.00% | depth=8 | -"
    assert row(shown, "accuracy").startswith(
        "accuracy | success | proportion | increase | accuracy | +2.00% | - | past_accuracy, 7d before | -"
    )
    assert row(shown, "latency_ms").startswith(
        "latency_ms | latency | mean | decrease | latency_ms | - | 10.00% | - | 2000"
    )
    assert "min_lift accuracy >= +2.00%" in shown
    assert "max_regression latency_ms <= 10.00%" in shown
    first = "1 | control 50% · treatment 50% | 2 | 2026-09-21 14:13:20 | 2026-09-21 14:23:20"
    assert row(shown, "1 | control") == first
    assert row(shown, "2 | control") == "2 | control 90% · treatment 10% | 3 | 2026-09-21 14:23:20 | -"
    assert row(shown, "3 | 2026") == "3 | 2026-09-21 14:23:20 | bob | update | arms: weights 0.9, 0.1"


def test_list_summary_decision_and_criterion_texts() -> None:
    e = experiment()
    assert experiment_summary(e) == "ranker-v2 (version 4): STOPPED, phase 2, control v1 90% · treatment v2 10%"
    listed = row(text(experiments_table([e])), "ranker-v2")
    assert listed == (
        "ranker-v2 | STOPPED | ab | ranker | control v1 90% · treatment v2 10% | 50.00% | 2 | 4 | search | "
        "2026-09-21 16:13:20"
    )
    record = xpb.DecisionRecord(
        action=xpb.DECISION_ACTION_SHIP_TREATMENT,
        arm="treatment",
        reason="every check passed",
        decided_by="alice",
        decided_at=at(7300),
        promotion_operation="op-7",
        phase=2,
        rollout_id="r-3",
    )
    assert decision_record_text(record) == (
        "SHIP_TREATMENT treatment (phase 2) by alice at 2026-09-21 16:15:00; gates: operation op-7; rollout r-3: "
        "every check passed"
    )
    assert criterion_text(xpb.Criterion(kind=xpb.CRITERION_KIND_MIN_UNITS, threshold=500)) == "min_units >= 500"
    exists = xpb.TargetingCondition(attribute="vip", operator=xpb.CONDITION_OPERATOR_EXISTS)
    assert condition_text(exists) == "vip exists"
    # A value a newer server sends and this client does not know is shown as its number, not an error.
    assert "STATUS" not in experiment_summary(xpb.Experiment(key="k", status=99))
    assert "99" in experiment_summary(xpb.Experiment(key="k", status=99))


def history() -> list[spb.HistoryPoint]:
    points = []
    for i in range(1, 25):
        for arm, lift in (("treatment", 0.034), ("wide", -0.012)):
            width = 0.4 / i**0.5
            points.append(
                spb.HistoryPoint(
                    at=at(300 * i),
                    arm_name=arm,
                    units=1000 * i,
                    relative_lift=lift + 0.01 / i,
                    sequential_interval=rpb.Interval(lower=lift - width, upper=lift + width),
                )
            )
    return points


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_the_plot_is_a_png_with_a_line_and_band_per_treatment_arm(tmp_path: Path) -> None:
    out = tmp_path / "plots" / "lift.png"
    assert plot_history(history(), out, "ranker-v2: accuracy", 0.02) == 2
    assert png_size(out) == (1000, 550)
    assert out.stat().st_size > 20_000
    with Image.open(out) as image:
        image.load()
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
    # Two lines, two translucent bands, the zero and MDE lines and text: far more than a blank canvas's colours.
    assert colours is not None
    assert len(colours) > 50


def test_the_plot_of_a_lower_is_better_metric_and_an_empty_history(tmp_path: Path) -> None:
    one_arm = [p for p in history() if p.arm_name == "wide"]
    out = tmp_path / "latency.png"
    assert plot_history(one_arm, out, "latency", 0.1, xpb.METRIC_DIRECTION_DECREASE) == 1
    assert png_size(out) == (1000, 550)
    with pytest.raises(ValueError, match="no results history yet"):
        plot_history([], tmp_path / "empty.png", "nothing")
    assert not (tmp_path / "empty.png").exists()
