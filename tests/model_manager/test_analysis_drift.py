"""The feature drift check of a rollout step on merged sketches: failed with the names over the limit, passed
below it, inconclusive on too few values, an error without training statistics; and its limit in the spec."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager.analysis import AnalysisSpec, Check, Verdict, analyse
from model_manager.drift_monitor import VersionBasis
from model_manager.window_sketches import merge_sketches
from model_manager.windows import LATENCY_BOUNDS_MS, Histogram, ShadowComparison, VersionMetrics
from tests.model_manager.monitor_support import REFS, sketches_of, traffic, training, window

BASIS = VersionBasis("churn", 2, {s.feature_name: s for s in training()}, None, REFS, ())
SPEC = AnalysisSpec(min_samples=10, max_feature_psi=0.2)


def metrics(rows: int, shift: float) -> VersionMetrics:
    w = window("churn", 2, sketches_of(traffic(17, rows, {"users:visits": shift})), start=100.0)
    merged = merge_sketches([w.sketches])
    empty = Histogram.empty(LATENCY_BOUNDS_MS)
    return VersionMetrics("churn", 2, {"OK": 500}, empty, {}, ShadowComparison(), 1, 100.0, 110.0, merged)


def decision(candidate: VersionMetrics, basis: VersionBasis | None = BASIS) -> tuple[Verdict, str, float | None]:
    analysis = analyse(candidate, None, SPEC, now=120.0, drift_basis=basis)
    found = analysis.decision(Check.FEATURE_DRIFT)
    assert found is not None
    return found.verdict, found.detail, found.measured


def test_a_drifted_input_fails_the_step_naming_it() -> None:
    verdict, detail, measured = decision(metrics(2000, 1.0))
    assert verdict is Verdict.FAILED
    assert detail.startswith("feature psi over the limit 0.2: users:visits ")
    assert "users:age" not in detail
    assert measured is not None
    assert measured > 0.2


def test_inputs_like_training_pass() -> None:
    verdict, detail, measured = decision(metrics(2000, 0.0))
    assert verdict is Verdict.PASSED, detail
    assert measured is not None
    assert measured < 0.05


def test_too_few_values_are_inconclusive_and_no_training_statistics_an_error() -> None:
    assert decision(metrics(999, 3.0))[:2] == (Verdict.INCONCLUSIVE, "feature psi: 999/1000 values")
    policy = rpb.DriftPolicy(min_rows=500)
    assert decision(metrics(999, 3.0), replace(BASIS, policy=policy))[0] is Verdict.FAILED, "the policy's min_rows"
    verdict, detail, _ = decision(metrics(2000, 1.0), None)
    assert (verdict, detail) == (Verdict.ERROR, "feature psi: no training statistics to compare with")


def test_the_limit_must_be_a_positive_finite_number() -> None:
    with pytest.raises(ValueError, match="max_feature_psi"):
        AnalysisSpec(max_feature_psi=0.0)
    assert AnalysisSpec.from_dict(SPEC.to_dict()) == SPEC
