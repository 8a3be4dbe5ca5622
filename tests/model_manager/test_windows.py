"""Metric windows: histograms, validation, dedup by id, merging per version and revision."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model_manager.windows import (
    LATENCY_BOUNDS_MS,
    Admission,
    Histogram,
    MetricWindow,
    ShadowComparison,
    WindowError,
    WindowLedger,
    merge_windows,
)


def window(
    wid: str = "w1",
    *,
    version: int = 2,
    revision: int = 5,
    start: float = 100.0,
    end: float = 110.0,
    status: dict[str, int] | None = None,
    latencies: tuple[float, ...] = (),
    gateway: str = "g1",
    mirrored: bool = False,
    shadow: ShadowComparison | None = None,
    scores: dict[str, Histogram] | None = None,
) -> MetricWindow:
    status = {"OK": len(latencies)} if status is None else status
    return MetricWindow(
        window_id=wid,
        gateway_id=gateway,
        model="churn",
        version=version,
        route_revision=revision,
        start=start,
        end=end,
        status_counts=status,
        latency_ms=Histogram.of(LATENCY_BOUNDS_MS, latencies),
        scores=scores or {},
        mirrored=mirrored,
        shadow=shadow,
    )


def test_histogram_counts_a_value_on_a_bound_into_that_bound_bucket():
    h = Histogram.of((1.0, 2.0), [0.5, 1.0, 1.5, 2.0, 2.5])
    assert h.counts == (2, 2, 1)
    assert h.total == 5


@pytest.mark.parametrize(
    ("bounds", "counts", "field"),
    [
        ((1.0, 1.0), (0, 0, 0), "ascending"),
        ((2.0, 1.0), (0, 0, 0), "ascending"),
        ((1.0,), (0, 0, 0), "expected 2 counts"),
        ((1.0,), (0, -1), "non-negative"),
        ((math.inf,), (0, 0), "finite"),
    ],
)
def test_histogram_refuses_malformed_buckets(bounds, counts, field):
    with pytest.raises(WindowError, match=field):
        Histogram(bounds, counts)


def test_histogram_merge_needs_the_same_bounds():
    with pytest.raises(WindowError, match="same bounds"):
        Histogram.empty((1.0, 2.0)).merge(Histogram.empty((1.0, 3.0)))


def test_quantile_interpolates_inside_the_bucket_like_prometheus():
    # 100 values: 50 in (0, 10], 50 in (10, 20]; the median rank 50 ends the first bucket, p75 is mid-second.
    h = Histogram((10.0, 20.0), (50, 50, 0))
    assert h.quantile(0.5) == pytest.approx(10.0)
    assert h.quantile(0.75) == pytest.approx(15.0)
    assert h.quantile(0.99) == pytest.approx(19.8)


def test_quantile_in_the_overflow_bucket_is_infinite_and_empty_is_nan():
    assert math.isinf(Histogram((10.0,), (1, 99)).quantile(0.99))
    assert math.isnan(Histogram.empty((10.0,)).quantile(0.5))


@settings(deadline=None)
@given(
    st.lists(st.floats(min_value=0.0, max_value=4999.0, allow_nan=False), min_size=1, max_size=300),
    st.sampled_from([0.5, 0.9, 0.99]),
)
def test_quantile_lies_in_the_bucket_of_the_exact_quantile(values, q):
    h = Histogram.of(LATENCY_BOUNDS_MS, values)
    exact = float(np.quantile(values, q, method="inverted_cdf"))
    bucket = Histogram.of(LATENCY_BOUNDS_MS, [exact]).counts.index(1)
    lo = 0.0 if bucket == 0 else LATENCY_BOUNDS_MS[bucket - 1]
    assert lo <= h.quantile(q) <= LATENCY_BOUNDS_MS[bucket]


@settings(deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=100.0, allow_nan=False), max_size=200), st.floats(0.0, 100.0))
def test_count_above_never_counts_a_value_at_or_below_the_threshold(values, threshold):
    bounds = (1.0, 5.0, 10.0, 50.0)
    certain = Histogram.of(bounds, values).count_above(threshold)
    assert certain <= sum(1 for v in values if v > threshold)


def test_count_above_counts_whole_buckets_above_the_threshold():
    h = Histogram.of((10.0, 20.0, 30.0), [5, 15, 25, 35, 36])
    assert h.count_above(20.0) == 3  # (20, 30] and overflow
    assert h.count_above(15.0) == 3  # (10, 20] straddles 15: not certain
    assert h.count_above(0.0) == 4


def test_window_validation_names_the_field():
    with pytest.raises(WindowError, match="window_id"):
        window("")
    with pytest.raises(WindowError, match="status_counts: 'TEAPOT'"):
        window(status={"TEAPOT": 1})
    with pytest.raises(WindowError, match=r"status_counts\[OK\]"):
        window(status={"OK": -1})
    with pytest.raises(WindowError, match="end"):
        window(start=10.0, end=10.0)
    with pytest.raises(WindowError, match="latency_ms"):
        window(status={"OK": 1}, latencies=(1.0, 2.0))
    with pytest.raises(WindowError, match="mirrored"):
        window(shadow=ShadowComparison(1, 0))
    with pytest.raises(WindowError, match=r"shadow\.disagreed"):
        ShadowComparison(compared=1, disagreed=2)
    with pytest.raises(WindowError, match="version"):
        window(version=0)


def test_a_retried_window_counts_once_and_a_reused_id_with_other_content_is_refused():
    ledger = WindowLedger()
    w = window(latencies=(3.0, 4.0))
    assert ledger.add(w) is Admission.ACCEPTED
    assert ledger.add(window(latencies=(3.0, 4.0))) is Admission.DUPLICATE
    assert ledger.merged("churn", 2).requests == 2
    with pytest.raises(WindowError, match="different content"):
        ledger.add(window(latencies=(3.0,)))


def test_ledger_refuses_unpublished_latency_bounds_and_changing_score_bins():
    ledger = WindowLedger(latency_bounds=(10.0, 100.0))
    with pytest.raises(WindowError, match=r"latency_ms\.bucket_bounds"):
        ledger.add(window())
    ledger = WindowLedger()
    ledger.add(window("a", scores={"p": Histogram.of((0.5,), [0.1])}))
    with pytest.raises(WindowError, match=r"scores\[p\]"):
        ledger.add(window("b", scores={"p": Histogram.of((0.4,), [0.1])}))
    assert len(ledger) == 1


def test_pruned_windows_are_forgotten_and_late_retries_of_them_are_stale():
    ledger = WindowLedger()
    ledger.add(window("old", start=0.0, end=10.0, latencies=(1.0,)))
    ledger.add(window("new", start=10.0, end=20.0, latencies=(1.0,)))
    assert ledger.prune(before=10.0) == 1
    assert ledger.add(window("old", start=0.0, end=10.0, latencies=(1.0,))) is Admission.STALE
    assert ledger.merged("churn", 2).requests == 1


def test_merged_sums_across_gateways_and_filters_by_version_revision_time_and_mirroring():
    ledger = WindowLedger()
    ledger.add(window("a", gateway="g1", status={"OK": 8, "INTERNAL": 1, "INVALID_ARGUMENT": 3}, latencies=(2.0,) * 9))
    ledger.add(window("b", gateway="g2", status={"OK": 5, "UNAVAILABLE": 2}, latencies=(40.0,) * 7))
    ledger.add(window("old-rev", revision=4, status={"INTERNAL": 50}))
    ledger.add(window("other-version", version=1, status={"OK": 70}))
    ledger.add(window("late", start=200.0, end=210.0, status={"OK": 1}))
    ledger.add(window("mirror", mirrored=True, status={"OK": 4}, shadow=ShadowComparison(4, 1, 0.5, 2)))
    m = ledger.merged("churn", 2, min_revision=5, until=150.0)
    assert m.requests == 19
    assert m.server_errors == 3
    assert m.client_errors == 3
    assert m.judged == 16
    assert m.latency_ms.total == 16
    assert m.windows == 2
    assert (m.start, m.end) == (100.0, 110.0)
    shadow = ledger.merged("churn", 2, mirrored=True)
    assert shadow.shadow == ShadowComparison(4, 1, 0.5, 2)
    assert shadow.requests == 4


def test_only_serving_side_codes_count_as_server_errors():
    client = {"INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED", "UNAUTHENTICATED", "FAILED_PRECONDITION"}
    client |= {"OUT_OF_RANGE", "CANCELLED", "ALREADY_EXISTS", "ABORTED"}
    m = merge_windows("churn", 2, [window(status=dict.fromkeys(client, 10))], LATENCY_BOUNDS_MS)
    assert m.server_errors == 0
    assert m.judged == 0
    server = {"INTERNAL", "UNAVAILABLE", "UNKNOWN", "DATA_LOSS", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
    m = merge_windows("churn", 2, [window(status=dict.fromkeys(server, 1) | {"OK": 4})], LATENCY_BOUNDS_MS)
    assert m.server_errors == 6
    assert m.judged == 10


def test_empty_merge_has_no_span():
    m = merge_windows("churn", 2, [], LATENCY_BOUNDS_MS)
    assert (m.requests, m.windows, m.start, m.end) == (0, 0, None, None)


@settings(deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 50),
            st.integers(0, 5),
            st.lists(st.floats(0.0, 6000.0, allow_nan=False), max_size=20),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_merging_is_order_independent_and_equals_the_histogram_of_all_values(parts):
    windows = []
    every: list[float] = []
    for i, (ok, err, lat) in enumerate(parts):
        windows.append(window(f"w{i}", status={"OK": ok + len(lat), "INTERNAL": err}, latencies=tuple(lat)))
        every.extend(lat)
    forward = merge_windows("churn", 2, windows, LATENCY_BOUNDS_MS)
    backward = merge_windows("churn", 2, reversed(windows), LATENCY_BOUNDS_MS)
    assert forward == backward
    assert forward.latency_ms == Histogram.of(LATENCY_BOUNDS_MS, every)
    assert forward.server_errors == sum(p[1] for p in parts)


def test_window_round_trips_through_json():
    w = window(
        mirrored=True,
        shadow=ShadowComparison(3, 1, 0.25, 0),
        scores={"p": Histogram.of((0.5,), [0.1, 0.9])},
        latencies=(1.0, 2.0, 3.0),
    )
    assert MetricWindow.from_dict(json.loads(json.dumps(w.to_dict()))) == w
