"""The rollout runtime's pure parts: route tables from wanted shares, window decoding, and the PSI reference."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from chassis.errors import InvalidArgument
from fresco.api.features.v1 import statistics_pb2 as spb
from fresco.api.models.v1 import rollout_pb2 as ro
from fresco.api.models.v1 import routing_pb2 as rtpb
from model_manager.analysis import Check, analyse
from model_manager.plans import Route
from model_manager.records import ModelSpec, VersionSpec
from model_manager.registry import Registry
from model_manager.rollout_messages import rollout_spec, strategy_message
from model_manager.rollout_registry import score_reference
from model_manager.route_builder import Desired, basis_points, build_table
from model_manager.routes import Endpoint
from model_manager.tables import sqlite_url
from model_manager.window_codec import decode_window
from model_manager.windows import LATENCY_BOUNDS_MS, Histogram, ShadowComparison, VersionMetrics, WindowError
from tests.model_manager.registry_support import artifact, signature

E1, E2 = Endpoint("10.0.0.1", 8001), Endpoint("10.0.0.2", 8001)


def test_weights_are_basis_points_summing_to_10000_with_the_baseline_taking_the_rounding() -> None:
    assert basis_points(Route({1: 66.666, 2: 33.334}, {}), [1, 2]) == {1: 6667, 2: 3333}
    assert sum(basis_points(Route({1: 0.01, 2: 99.99}, {}), [1, 2]).values()) == 10_000


def test_a_table_lists_the_baseline_first_and_gives_no_traffic_to_a_version_warm_nowhere() -> None:
    warm = {("fraud", 1): (E1,), ("fraud", 2): (E2,)}
    wanted = [Desired("fraud", Route({3: 10.0, 1: 90.0}, {2: 5.0}), baseline=1, fallback=1)]
    table = build_table(7, wanted, lambda m, v: warm.get((m, v), ()))
    route = table.route("fraud")
    assert [(v.version, v.weight) for v in route.versions] == [("1", 9000), ("2", 0)]
    assert route.shadow is not None
    assert route.shadow.version == "2"
    assert route.fallback == "1"
    assert table.revision == 7
    assert build_table(8, [Desired("idle", Route({1: 100.0}, {}))], lambda m, v: ()).routes == ()


def test_a_window_that_cannot_be_decoded_names_the_field() -> None:
    w = rtpb.MetricsWindow(model_name="fraud", version=1, window_id="w", route_revision=1, status_counts={"OK": 1})
    with pytest.raises(WindowError, match="window_start"):
        decode_window(w, "gw", LATENCY_BOUNDS_MS)
    w.window_start.FromSeconds(100)
    w.window_end.FromSeconds(110)
    w.latency.histogram.CopyFrom(spb.Histogram(bucket_bounds=[1.0, 2.0], bucket_counts=[1]))
    with pytest.raises(WindowError, match=r"^latency\.histogram\.bucket_counts"):
        decode_window(w, "gw", LATENCY_BOUNDS_MS)
    w.ClearField("latency")
    decoded = decode_window(w, "gw", LATENCY_BOUNDS_MS)
    assert (decoded.start, decoded.end, decoded.requests, decoded.gateway_id) == (100.0, 110.0, 1, "gw")


def test_the_psi_reference_is_the_training_histogram_of_the_score_output(tmp_path: Path) -> None:
    registry = Registry.open(sqlite_url(tmp_path / "r.db"))
    try:
        name = f"m-{uuid.uuid4().hex[:8]}"
        registry.create_model(ModelSpec(name=name, owner="risk", signature=signature()), "tester")
        score = spb.FeatureStatistics(
            feature_name="probability",
            numeric=spb.NumericStatistics(histogram=spb.Histogram(bucket_bounds=[0.5], bucket_counts=[70, 30])),
        )
        content = b"v1"
        spec = VersionSpec(
            model_name=name,
            format="onnx",
            expected_sha256=artifact(content).sha256,
            signature=signature(),
            training_statistics=(score,),
        )
        registry.register_version(spec, artifact(content), "tester")
        reference = score_reference(registry, name, 1, "")
        assert reference is not None
        assert (reference.bounds, reference.counts) == ((0.5,), (70, 30))
        assert score_reference(registry, name, 1, "other") is None
    finally:
        registry.close()


def test_a_shadow_comparison_limit_on_the_mean_score_difference_round_trips_and_is_judged_under_its_own_check() -> None:
    comparison = ro.AnalysisThresholds(max_mean_abs_score_diff=0.02, min_samples=10)
    strategy = ro.RolloutStrategy(shadow=ro.ShadowStrategy(mirror_percent=20, comparison=comparison))
    spec = rollout_spec("deployment.strategy", "m", 2, 1, strategy, None)
    assert spec.analysis is not None
    assert spec.analysis.max_mean_abs_score_diff == pytest.approx(0.02)
    back = strategy_message(spec).shadow.comparison
    assert back.HasField("max_mean_abs_score_diff")
    assert back.max_mean_abs_score_diff == pytest.approx(0.02)
    shadow = ShadowComparison(compared=20, disagreed=20, abs_diff_sum=2.0)
    shifted = VersionMetrics("m", 2, {"OK": 20}, Histogram.empty(LATENCY_BOUNDS_MS), {}, shadow, 1, 0.0, 1.0)
    decision = analyse(shifted, None, spec.analysis, now=1.0).decision(Check.SHADOW_MEAN_ABS_DIFF)
    assert decision is not None
    assert decision.measured == pytest.approx(0.1)
    assert (decision.threshold, decision.samples) == (0.02, 20)
    still_refused = ro.RolloutStrategy(
        shadow=ro.ShadowStrategy(mirror_percent=20, comparison=ro.AnalysisThresholds(max_score_mean_shift=1.0))
    )
    with pytest.raises(InvalidArgument, match="max_score_mean_shift"):
        rollout_spec("deployment.strategy", "m", 2, 1, still_refused, None)
