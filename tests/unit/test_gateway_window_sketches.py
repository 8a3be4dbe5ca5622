"""Value sketches and prediction records in the gateway's metric windows: the inputs a version was
called with (as the tensors built from the rows), its scores, and the predictions kept for late labels."""

from __future__ import annotations

import warnings

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chassis.errors import InvalidArgument
from fresco.api.models.v1 import monitoring_pb2, routing_pb2
from fresco.monitoring.sketches import MAX_CATEGORIES, ColumnSketch
from gateway.assembly import FeatureValue, InputSpec, ModelSignature, build_inputs
from gateway.metric_windows import MetricWindows, WindowKey
from gateway.window_sketches import BLOCK_ROWS, KEPT_CATEGORIES, Called
from model_manager.routes import MetricsConfig

METRICS = MetricsConfig((10.0, 100.0), 10.0)
LIVE = WindowKey("fraud", "2", 5)
SIGNATURE = ModelSignature(
    "m",
    (
        InputSpec("x", "FP64", (-1, 2), ("amount", "age")),
        InputSpec("country", "BYTES", (-1, 1)),
        InputSpec("member", "BOOL", (-1, 1)),
    ),
    ("p",),
)
FEATURE, SCORE = monitoring_pb2.VALUE_SKETCH_KIND_FEATURE, monitoring_pb2.VALUE_SKETCH_KIND_SCORE


def windows(**options: int | bool) -> MetricWindows:
    clock = iter(range(10**18, 2 * 10**18, 10**9))
    return MetricWindows("gw-1", clock_ns=lambda: next(clock), **options)  # type: ignore[arg-type]


def called(rows: list[dict[str, FeatureValue]], signature: ModelSignature = SIGNATURE) -> Called:
    return Called(signature, build_inputs(signature, rows, [f"r{i}" for i in range(len(rows))]))


def sketches(window: routing_pb2.MetricsWindow) -> dict[tuple[int, str], ColumnSketch]:
    return {(s.kind, s.name): ColumnSketch.from_proto(s) for s in window.value_sketches}


def retained(sketch: ColumnSketch) -> list[float]:
    """The values a KLL sketch holds, each repeated by its weight (all of them, exactly, below k)."""
    return sorted(value for value, weight in sketch.kll for _ in range(int(weight)))


def test_each_feature_and_the_score_get_a_sketch_of_what_the_version_was_called_with() -> None:
    amounts = [3.5, float("nan"), 12.0, float("inf"), -1.25, 7.0]
    countries: list[str | bytes] = ["fr", "de", "fr", b"fr", "it", "de"]
    rows: list[dict[str, FeatureValue]] = [
        {"amount": a, "age": i, "country": c, "member": i % 2 == 0}
        for i, (a, c) in enumerate(zip(amounts, countries, strict=True))
    ]
    scores = [0.1, 0.9, 0.4, None, 0.75, 0.3]
    observed = windows()
    # Batches of 1, 2 and 3 rows, as groups of three requests would bring them.
    for start, stop in ((0, 1), (1, 3), (3, 6)):
        observed.record(
            LIVE,
            METRICS,
            "OK",
            5.0,
            count=stop - start,
            scores=scores[start:stop],
            score_output="p",
            called=called(rows[start:stop]),
        )
    (window,) = observed.roll()
    found = sketches(window)
    features = {name for kind, name in found if kind == FEATURE}
    assert features == {"amount", "age", "country", "member"}
    assert {name for kind, name in found if kind == SCORE} == {"p"}
    amount = found[FEATURE, "amount"]
    assert (amount.count, amount.null_count, amount.invalid_count) == (6, 1, 1)  # NaN is null, inf invalid
    assert retained(amount) == [-1.25, 3.5, 7.0, 12.0]
    assert retained(found[FEATURE, "age"]) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    country = found[FEATURE, "country"]
    assert dict(country.categories) == {"fr": 3, "de": 2, "it": 1}  # bytes are read as text
    assert country.numeric_count() == 0
    assert dict(found[FEATURE, "member"].categories) == {"true": 3, "false": 3}
    score = found[SCORE, "p"]
    assert score.count == 5  # the answer without a score is not counted
    assert retained(score) == [0.1, 0.3, 0.4, 0.75, 0.9]
    assert score.kll.get_quantile(0.5) == 0.4


def test_rows_beyond_a_block_are_sketched_once_each() -> None:
    signature = ModelSignature("m", (InputSpec("x", "FP32", (-1, 1), ("v",)),), ("p",))
    values = [float(i) for i in range(BLOCK_ROWS * 3)]
    observed = windows()
    sent = 0
    for size in (1, 64, 3, BLOCK_ROWS - 5, 1, 64, BLOCK_ROWS, 200):  # blocks fill and flush across batches
        batch = values[sent : sent + size]
        observed.record(
            LIVE, METRICS, "OK", 1.0, count=len(batch), scores=batch, score_output="p",
            called=called([{"v": v} for v in batch], signature),
        )  # fmt: skip
        sent += size
    assert sent > 2 * BLOCK_ROWS
    (window,) = observed.roll()
    found = sketches(window)
    for key in ((FEATURE, "v"), (SCORE, "p")):
        assert found[key].count == sent
        assert found[key].kll.n == sent
        assert found[key].kll.get_min_value() == 0.0
        assert found[key].kll.get_max_value() == float(sent - 1)


def test_predictions_are_kept_up_to_the_cap_and_the_rest_counted() -> None:
    observed = windows(record_cap=3)
    ids = [("a", "u1"), ("b", ""), ("c", "u3"), ("nan", "")]
    scores = [0.2, None, 0.8, float("nan")]
    observed.record(LIVE, METRICS, "OK", 1.0, count=4, scores=scores, score_output="p", predictions=ids)
    observed.record(
        LIVE, METRICS, "OK", 1.0, count=3, scores=[0.5, 0.6, 0.7], score_output="p",
        predictions=[("d", ""), ("e", ""), ("f", "")],
    )  # fmt: skip
    (window,) = observed.roll()
    records = [(r.request_id, r.score, r.unit_id) for r in window.prediction_records]
    assert records == [("a", 0.2, "u1"), ("c", 0.8, "u3"), ("d", 0.5, "")]  # "b" had no score, "nan" no finite one
    assert window.prediction_records_dropped == 2
    first = window.prediction_records[0].time.ToNanoseconds()
    assert window.window_start.ToNanoseconds() <= first <= window.window_end.ToNanoseconds()
    # The next window starts with its own cap.
    observed.record(LIVE, METRICS, "OK", 1.0, scores=[0.1], score_output="p", predictions=[("g", "")])
    (second,) = observed.roll()
    assert [r.request_id for r in second.prediction_records] == ["g"]
    assert second.prediction_records_dropped == 0


def test_without_value_sketches_windows_keep_counts_and_records_only() -> None:
    observed = windows(value_sketches=False)
    rows: list[dict[str, FeatureValue]] = [{"amount": 1.0, "age": 2, "country": "fr", "member": True}]
    observed.record(
        LIVE, METRICS, "OK", 1.0, scores=[0.4], score_output="p", score_bounds=(0.5,), called=called(rows),
        predictions=[("a", "")],
    )  # fmt: skip
    (window,) = observed.roll()
    assert window.request_count == 1
    assert list(window.score_histograms[0].histogram.bucket_counts) == [1, 0]
    assert not window.value_sketches
    assert [r.request_id for r in window.prediction_records] == ["a"]


def test_a_text_feature_with_a_new_value_per_request_stays_bounded() -> None:
    signature = ModelSignature("m", (InputSpec("user", "BYTES", (-1, 1)),), ("p",))
    observed = windows()
    total = KEPT_CATEGORIES * 3
    for start in range(0, total, 64):
        batch = [{"user": "common" if i % 2 else f"user-{i}"} for i in range(start, start + 64)]
        observed.record(LIVE, METRICS, "OK", 1.0, count=64, called=called(batch, signature))  # type: ignore[arg-type]
    (window,) = observed.roll()
    (message,) = window.value_sketches
    assert len(message.categories) <= MAX_CATEGORIES
    assert message.categories[0].value == "common"
    assert message.categories[0].count == total // 2
    assert sum(c.count for c in message.categories) + message.other_category_count == total
    assert message.count == total


def test_a_large_unnamed_input_is_not_sketched_but_named_features_are() -> None:
    signature = ModelSignature(
        "m", (InputSpec("image", "FP32", (-1, 32, 32)), InputSpec("x", "FP32", (-1, 1), ("v",))), ("p",)
    )
    inputs = {"image": np.zeros((2, 32, 32), dtype=np.float32), "x": np.ones((2, 1), dtype=np.float32)}
    observed = windows()
    observed.record(LIVE, METRICS, "OK", 1.0, count=2, called=Called(signature, inputs))
    (window,) = observed.roll()
    assert [(s.name, s.count) for s in window.value_sketches] == [("v", 2)]


def test_a_shadow_window_carries_the_score_sketch_only() -> None:
    observed = windows()
    shadow = WindowKey("fraud", "3", 5, shadow=True)
    observed.compare(shadow, METRICS, False, 0.0)  # a comparison may open the window before the scores
    observed.record(shadow, METRICS, "OK", 2.0, count=2, scores=[0.3, 0.6], score_output="p", score_bounds=(0.5,))
    (window,) = observed.roll()
    assert [(s.kind, s.name, s.count) for s in window.value_sketches] == [(SCORE, "p", 2)]
    assert list(window.score_histograms[0].histogram.bucket_counts) == [1, 1]
    assert not window.prediction_records


VALUES = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.lists(st.floats(), max_size=3),
)
DATATYPES = st.sampled_from(["FP32", "FP64", "INT64", "INT8", "UINT8", "BOOL", "BYTES", "BF16"])


@settings(derandomize=True, max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(st.fixed_dictionaries({}, optional={"a": VALUES, "b": VALUES}), min_size=1, max_size=6),
    datatype=DATATYPES,
    named=st.booleans(),
)
def test_whatever_values_callers_send_the_windows_never_fail(
    rows: list[dict[str, FeatureValue]], datatype: str, named: bool
) -> None:
    spec = InputSpec("x", datatype, (-1, 2), ("a", "b")) if named else InputSpec("a", datatype, (-1,))
    signature = ModelSignature("m", (spec,), ("p",))
    try:
        with warnings.catch_warnings():  # a double too large for FP32 becomes inf (counted invalid), with a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            call = called(rows, signature)
    except InvalidArgument:  # refused before any predictor is called: nothing to sketch
        return
    observed = windows()
    observed.record(LIVE, METRICS, "OK", 1.0, count=len(rows), called=call)
    (window,) = observed.roll()
    counts = {s.name: s.count for s in window.value_sketches}
    for sketch in window.value_sketches:
        ColumnSketch.from_proto(sketch)  # what the manager will read back
        assert sketch.count >= sketch.null_count + sketch.invalid_count
    if named:
        assert counts == {"a": len(rows), "b": len(rows)}
    else:
        assert counts["a"] == call.inputs["a"].size
    assert np.all(np.isfinite([v for s in sketches(window).values() for v, _ in s.kll]))
