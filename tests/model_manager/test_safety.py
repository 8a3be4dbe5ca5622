"""The safety score of a model family, checked number by number: a family of seven versions whose parts each have
covered and missing items, read from a real registry and rollout store (rollouts driven by the real state machine)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fresco.api.features.v1 import statistics_pb2 as spb
from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager import safety
from model_manager.alert_rules import load_rules
from model_manager.lifecycle import Stage
from model_manager.monitor_store import MonitorStore
from model_manager.plans import CanaryStep, RolloutSpec, Strategy
from model_manager.registry import Registry
from model_manager.rollout import Rollout
from model_manager.rollout_store import RolloutStore
from model_manager.safety_sources import SafetySources, mirrored
from model_manager.tables import open_engine, sqlite_url
from tests.model_manager.monitor_support import SCORE, sketch, window
from tests.model_manager.registry_support import artifact, model_spec, version_spec
from tests.model_manager.rollout_driver import Controller, FakeClock

FAMILY = "fam"
ALERTS = Path(__file__).parents[2] / "deploy" / "prometheus" / "alerts.yml"
WHO = "tester"


def backtest_gate() -> rpb.GateResult:
    return rpb.GateResult(
        name="backtest.auc.min_value",
        type=rpb.GATE_TYPE_BACKTEST,
        passed=True,
        backtest=rpb.BacktestReport(rows=500, metrics={"auc": 0.9}),
    )


def schema_gate() -> rpb.GateResult:
    return rpb.GateResult(name="schema.signature", type=rpb.GATE_TYPE_SCHEMA, passed=True)


def passing_report(
    coverage: float | None = 0.9, tests: int = 40, failures: int = 0, errors: int = 0
) -> rpb.TestSummary:
    summary = rpb.TestSummary(tests=tests, failures=failures, errors=errors)
    if coverage is not None:
        summary.line_coverage = coverage
    return summary


class Family:
    """A registry, a rollout store and one clock (seconds) that both read."""

    def __init__(self, path: Path) -> None:
        self.clock = FakeClock(1_000.0)
        self.registry = Registry(open_engine(sqlite_url(path)), clock=lambda: int(self.clock.now * 1e6))
        self.rollouts = RolloutStore(self.registry.engine)
        self.rollout_count = 0
        self.registry.create_model(model_spec(FAMILY), WHO)

    def register(self, number: int, summary: rpb.TestSummary | None, **overrides: object) -> None:
        spec = version_spec(FAMILY, f"artifact {number}".encode(), version=number, **overrides)
        spec = replace(spec, test_summary=summary)
        self.registry.register_version(spec, artifact(f"artifact {number}".encode()), WHO)

    def to_candidate(self, number: int, gates: list[rpb.GateResult]) -> None:
        self.registry.set_stage(FAMILY, number, Stage.VALIDATING, WHO)
        self.registry.set_stage(FAMILY, number, Stage.CANDIDATE, WHO, gates=gates)

    def to_production(self, number: int, gates: list[rpb.GateResult] | None, at: float) -> None:
        """Into production, through the gates (None: a candidate already)."""
        if gates is not None:
            self.to_candidate(number, gates)
        self.clock.now = at
        self.registry.set_stage(FAMILY, number, Stage.PRODUCTION, WHO)

    def roll_out(self, spec: RolloutSpec, at: float) -> None:
        """Run a rollout through the real state machine to its end and store it as the controller would."""
        self.clock.now = at
        self.rollout_count += 1
        driver = Controller(Rollout.start(f"r-{self.rollout_count}", spec, 1, self.clock), self.clock)
        driver.run()
        self.rollouts.save(driver.rollout.to_dict(), pending_unload=False)


def canary_with_mirror(version: int, baseline: int) -> RolloutSpec:
    steps = (CanaryStep(weight=10.0, dwell=30.0, mirror=50.0), CanaryStep(weight=100.0))
    return RolloutSpec(FAMILY, version, baseline, Strategy.CANARY, steps=steps)


def shadow_of(version: int, baseline: int) -> RolloutSpec:
    return RolloutSpec(FAMILY, version, baseline, Strategy.SHADOW, mirror_percent=100.0, shadow_duration=60.0)


def v3_statistics() -> tuple[spb.FeatureStatistics, ...]:
    """users:age and the score have training statistics; users:spend has none."""
    return (
        spb.FeatureStatistics(feature_name="users:age", count=100, numeric=spb.NumericStatistics(min=18, max=90)),
        spb.FeatureStatistics(feature_name="probability", count=100, numeric=spb.NumericStatistics(min=0, max=1)),
    )


@pytest.fixture
def family(tmp_path: Path) -> Iterator[Family]:
    """v1 production then archived: backtest, never mirrored. v2: canary with a mirror share before production,
    backtest. v3 (production): no backtest, mirrored only after production, failing tests. v4 candidate, mirrored,
    tests pass. v5 registered without a report. v6 rejected. v7 registered, coverage 50%."""
    f = Family(tmp_path / "registry.db")
    f.register(1, passing_report())
    f.register(2, passing_report())
    f.register(3, passing_report(failures=2, errors=1), training_statistics=v3_statistics())
    f.register(4, passing_report(coverage=0.85))
    f.register(5, None)
    f.register(6, None)
    f.register(7, passing_report(coverage=0.5))
    f.to_production(1, [schema_gate(), backtest_gate()], at=2_000.0)
    f.to_candidate(2, [schema_gate(), backtest_gate()])
    f.roll_out(canary_with_mirror(2, baseline=1), at=2_500.0)
    f.to_production(2, None, at=3_000.0)  # its gates ran when it became a candidate
    f.to_production(3, [schema_gate()], at=4_000.0)
    f.roll_out(shadow_of(3, baseline=2), at=5_000.0)
    f.to_candidate(4, [schema_gate(), backtest_gate()])
    f.roll_out(shadow_of(4, baseline=3), at=6_000.0)
    f.registry.set_stage(FAMILY, 6, Stage.REJECTED, WHO)
    yield f
    f.registry.close()


def parts_by_name(parts: tuple[safety.Part, ...]) -> dict[str, safety.Part]:
    return {p.name: p for p in parts}


def test_the_rollouts_stored_record_when_mirrored_traffic_was_acknowledged(family: Family) -> None:
    sources = SafetySources(family.registry, family.rollouts, clock=family.clock)
    evidence = sources.evidence(FAMILY)
    assert sorted(evidence.production_since_us) == [1, 2, 3]
    assert evidence.production_since_us[1] == 2_000_000_000
    assert evidence.production_since_us[3] == 4_000_000_000
    assert sorted(evidence.mirrored_since_s) == [2, 3, 4]
    assert 2_500.0 <= evidence.mirrored_since_s[2] < 3_000.0
    assert evidence.mirrored_since_s[3] >= 5_000.0
    # The canary's unmirrored full step is not counted: only its first phase mirrored.
    stored = family.rollouts.page(model_name=FAMILY).items
    canary = next(s for s in stored if s.data["spec"]["version"] == 2)
    assert len(mirrored(canary.data)) == 1


def test_each_part_counts_covered_and_missing_items(family: Family) -> None:
    sources = SafetySources(family.registry, family.rollouts, clock=family.clock)
    value, parts = safety.score(sources.evidence(FAMILY))
    by = parts_by_name(parts)
    assert [p.name for p in parts] == list(safety.PARTS)

    offline = by["offline_evaluation"]
    assert (offline.covered, offline.total) == (2, 3)
    assert offline.missing == ("v3: reached production without a stored backtest report",)

    shadow = by["shadow"]
    assert (shadow.covered, shadow.total) == (1, 3)
    assert shadow.missing == (
        "v1: reached production without running in shadow first",
        "v3: mirrored only after it reached production",
    )

    tests = by["unit_tests"]  # v1, v2 archived and v6 rejected do not count
    assert (tests.covered, tests.total) == (1, 4)
    assert tests.missing == (
        "v3: 2 failed and 1 errored of 40 tests",
        "v5: registered without a test report",
        "v7: line coverage 50.0% < 80%",
    )

    monitoring = by["monitoring"]  # no monitor store, no rules: v3's two features, its score and the alert rule
    assert (monitoring.covered, monitoring.total) == (0, 4)
    assert monitoring.missing[1] == (
        "v3 feature users:spend: no live drift monitor (no sketches in the last 1 h); "
        "no training statistics to compare against"
    )
    assert monitoring.missing[-1].startswith("alert rules: none loaded reads fresco_feature_drift_*")

    assert value == pytest.approx(100 * (2 / 3 + 1 / 3 + 1 / 4 + 0) / 4)
    answer = sources.score(FAMILY)
    assert answer.score == pytest.approx(value)
    assert [(p.name, p.covered, p.total) for p in answer.parts] == [(p.name, p.covered, p.total) for p in parts]
    assert answer.parts[0].score == pytest.approx(2 / 3)
    assert answer.computed_at.seconds == int(family.clock.now)


def test_monitoring_counts_live_monitors_training_statistics_and_a_drift_rule(family: Family) -> None:
    rules = load_rules([ALERTS])  # the platform's rules: one of them reads the drift gauges
    sources = SafetySources(family.registry, family.rollouts, rules=rules, clock=family.clock)
    evidence = replace(
        sources.evidence(FAMILY),
        live_names={3: {"users:age", "probability"}, 2: {"users:spend"}},  # v2 is archived: not counted
    )
    assert evidence.drift_rules == ["FrescoFeatureDrift"]
    part = safety.monitoring(evidence)
    assert (part.covered, part.total) == (3, 4)
    assert part.missing == (
        "v3 feature users:spend: no live drift monitor (no sketches in the last 1 h); "
        "no training statistics to compare against",
    )
    latency_only = [r for r in rules if r.name == "FrescoPredictionLatencyP99High"]
    assert safety.drift_rules(latency_only) == []


def test_monitoring_reads_live_monitors_from_the_drift_store(family: Family) -> None:
    store = MonitorStore(family.registry.engine, clock=family.clock)
    now = family.clock.now
    values = np.linspace(0.0, 1.0, 50)
    store.add(
        [
            window(FAMILY, 3, [sketch("users:age", values), sketch("probability", values, SCORE)], start=now - 600),
            window(FAMILY, 3, [sketch("users:spend", values)], start=now - 2 * 3600),  # over an hour ago
            window(FAMILY, 2, [sketch("users:spend", values)], start=now - 60),  # v2 is archived
        ]
    )
    sources = SafetySources(family.registry, family.rollouts, store, clock=family.clock)
    part = safety.monitoring(sources.evidence(FAMILY))
    assert (part.covered, part.total) == (2, 4)
    assert part.missing == (
        "v3 feature users:spend: no live drift monitor (no sketches in the last 1 h); "
        "no training statistics to compare against",
        "alert rules: none loaded reads fresco_feature_drift_* (give the manager --alert-rules)",
    )


def test_a_family_without_production_scores_zero_where_nothing_counts(tmp_path: Path) -> None:
    f = Family(tmp_path / "registry.db")
    f.register(1, passing_report())
    value, parts = safety.score(SafetySources(f.registry, f.rollouts).evidence(FAMILY))
    by = parts_by_name(parts)
    assert (by["offline_evaluation"].total, by["offline_evaluation"].score) == (0, 0.0)
    assert by["offline_evaluation"].missing == ("no version has reached production yet",)
    assert by["shadow"].missing == ("no version has reached production yet",)
    assert by["monitoring"].missing == ("no production version to monitor",)
    assert (by["unit_tests"].covered, by["unit_tests"].total) == (1, 1)
    assert value == pytest.approx(25.0)
    f.registry.close()
