"""The safety score of a model family (the versions of one model name): four coverages, each with what it misses.

- offline evaluation: of the versions that reached production, those whose gate results hold a backtest report;
- shadow: of the same versions, those that got mirrored traffic (a shadow rollout, or a canary step with a mirror
  share, acknowledged by the gateways) before they first entered production;
- unit tests: of the versions that can still serve or be promoted (not rejected, not archived), those registered with
  a test report of at least one test, no failure, no error and line coverage of at least MIN_LINE_COVERAGE;
- monitoring: for the production version, each input feature and the score output with a live drift monitor (sketches
  within LIVE_WINDOW_S) and training statistics to compare against, plus one item for a loaded alert rule on drift.

A part with nothing to count scores 0 and says why (a family with no production version yet is not safe by
default). The score is 100 times the mean of the four parts. Pure: the inputs are read by `safety_sources`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass

from fresco.api.models.v1 import monitoring_pb2 as mpb
from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager.alert_rules import AlertRule
from model_manager.lifecycle import Stage
from model_manager.records import VersionRecord, default_score_output

MIN_LINE_COVERAGE = 0.8
LIVE_WINDOW_S = 3600.0
DRIFT_PREFIX = "fresco_feature_drift_"
PARTS = ("offline_evaluation", "shadow", "unit_tests", "monitoring")
# Versions that unit tests count: the ones that may still serve or be promoted.
TESTED_STAGES = frozenset({Stage.REGISTERED, Stage.VALIDATING, Stage.CANDIDATE, Stage.PRODUCTION})


@dataclass(frozen=True)
class FamilyEvidence:
    """What the score is computed from, read from the registry, the rollout store, the monitor store and the rules."""

    model_name: str
    versions: Sequence[VersionRecord]
    production_since_us: Mapping[int, int]  # when each version first entered production (audit log)
    mirrored_since_s: Mapping[int, float]  # when mirrored traffic to each version was first acknowledged
    live_names: Mapping[int, Set[str]]  # feature and score names with sketches in the last LIVE_WINDOW_S
    drift_rules: Sequence[str]  # names of the loaded alert rules whose expression reads fresco_feature_drift_*


@dataclass(frozen=True)
class Part:
    """One coverage: covered of total items, and one line per missing item."""

    name: str
    covered: int
    total: int
    missing: tuple[str, ...]
    explanation: str

    @property
    def score(self) -> float:
        """The covered share; 0 when nothing counts."""
        return self.covered / self.total if self.total else 0.0

    def to_proto(self) -> mpb.SafetyPart:
        """As the API shows it."""
        return mpb.SafetyPart(
            name=self.name,
            score=self.score,
            covered=self.covered,
            total=self.total,
            missing=self.missing,
            explanation=self.explanation,
        )


def drift_rules(rules: Iterable[AlertRule]) -> list[str]:
    """The names of the alert rules that cover drift: their expression reads a fresco_feature_drift_* series."""
    return [rule.name for rule in rules if any(m.startswith(DRIFT_PREFIX) for m in rule.metrics)]


def score(evidence: FamilyEvidence) -> tuple[float, tuple[Part, ...]]:
    """The family's score in [0, 100] and its four parts, in PARTS order."""
    parts = (offline_evaluation(evidence), shadow(evidence), unit_tests(evidence), monitoring(evidence))
    return 100.0 * sum(p.score for p in parts) / len(parts), parts


def _promoted(evidence: FamilyEvidence) -> list[VersionRecord]:
    return sorted((v for v in evidence.versions if v.version in evidence.production_since_us), key=_number)


def _number(v: VersionRecord) -> int:
    return v.version


NONE_IN_PRODUCTION = "no version has reached production yet"


def offline_evaluation(evidence: FamilyEvidence) -> Part:
    """Versions that reached production with a backtest report among their gate results."""
    counted = _promoted(evidence)
    gap = "reached production without a stored backtest report"
    missing = [f"v{v.version}: {gap}" for v in counted if not _backtested(v)]
    return Part(
        PARTS[0],
        len(counted) - len(missing),
        len(counted),
        tuple(missing) if counted else (NONE_IN_PRODUCTION,),
        "versions that reached production with a backtest report in their promotion gate results",
    )


def _backtested(v: VersionRecord) -> bool:
    return any(g.type == rpb.GATE_TYPE_BACKTEST and g.HasField("backtest") for g in v.gate_results)


def shadow(evidence: FamilyEvidence) -> Part:
    """Versions that got acknowledged mirrored traffic before they first entered production."""
    counted = _promoted(evidence)
    missing = []
    for v in counted:
        mirrored = evidence.mirrored_since_s.get(v.version)
        if mirrored is None:
            missing.append(f"v{v.version}: reached production without running in shadow first")
        elif mirrored * 1e6 > evidence.production_since_us[v.version]:
            missing.append(f"v{v.version}: mirrored only after it reached production")
    return Part(
        PARTS[1],
        len(counted) - len(missing),
        len(counted),
        tuple(missing) if counted else (NONE_IN_PRODUCTION,),
        "versions that reached production after running in shadow (a shadow rollout or a canary step's mirror)",
    )


def unit_tests(evidence: FamilyEvidence) -> Part:
    """Versions that may still serve, registered with a passing test report of enough line coverage."""
    counted = sorted((v for v in evidence.versions if v.stage in TESTED_STAGES), key=_number)
    missing = [f"v{v.version}: {why}" for v in counted if (why := _test_gap(v.test_summary))]
    return Part(
        PARTS[2],
        len(counted) - len(missing),
        len(counted),
        tuple(missing) if counted else ("no version that may serve (all are rejected or archived)",),
        f"versions not rejected or archived whose test report has tests, no failure or error and line coverage "
        f">= {MIN_LINE_COVERAGE:.0%}",
    )


def _test_gap(summary: rpb.TestSummary | None) -> str:
    if summary is None:
        return "registered without a test report"
    if summary.tests == 0:
        return "its test report holds no tests"
    if summary.skipped >= summary.tests:
        return f"every one of its {summary.tests} tests was skipped"
    if summary.failures or summary.errors:
        return f"{summary.failures} failed and {summary.errors} errored of {summary.tests} tests"
    if not summary.HasField("line_coverage"):
        return "its test report has no coverage report"
    if summary.line_coverage < MIN_LINE_COVERAGE:
        return f"line coverage {summary.line_coverage:.1%} < {MIN_LINE_COVERAGE:.0%}"
    return ""


def monitored_names(v: VersionRecord) -> list[tuple[str, str]]:
    """(kind, name) of what a version's monitors watch: its input features, then its score output."""
    signature = v.signature
    features = list(signature.feature_refs) or [t.name for t in signature.inputs if t.name != signature.feature_input]
    if not features:
        features = [s.feature_name for s in v.training_statistics]
    items = [("feature", name) for name in features]
    if score := default_score_output(v):  # the output routes sketch and compare unless a rollout names another
        items.append(("score", score))
    return items


def monitoring(evidence: FamilyEvidence) -> Part:
    """The production version's features and score with live monitors and training statistics, and a drift rule."""
    production = sorted((v for v in evidence.versions if v.stage is Stage.PRODUCTION), key=_number)
    missing: list[str] = []
    total = 0
    for v in production:
        live = evidence.live_names.get(v.version, frozenset())
        trained = {s.feature_name for s in v.training_statistics}
        for kind, name in monitored_names(v):
            total += 1
            gaps = []
            if name not in live:
                gaps.append(f"no live drift monitor (no sketches in the last {LIVE_WINDOW_S / 3600:g} h)")
            if name not in trained:
                gaps.append("no training statistics to compare against")
            if gaps:
                missing.append(f"v{v.version} {kind} {name}: {'; '.join(gaps)}")
    if production:
        total += 1
        if not evidence.drift_rules:
            missing.append("alert rules: none loaded reads fresco_feature_drift_* (give the manager --alert-rules)")
    return Part(
        PARTS[3],
        total - len(missing),
        total,
        tuple(missing) if production else ("no production version to monitor",),
        "the production version's features and score with a live drift monitor and training statistics, "
        "plus a loaded alert rule on fresco_feature_drift_*",
    )
