"""The monitor store: sketches merged exactly per bucket and window, window boundaries, a window id counted once
(also across a restart and a crash between the ledger and the store), pruning after a day, on SQLite and PostgreSQL."""

from __future__ import annotations

import numpy as np
import pytest
import sqlalchemy as sa

from fresco.monitoring.sketches import ColumnSketch
from model_manager.monitor_store import BUCKET_S, DAY_S, RETENTION_S, MonitorStore, monitor_buckets
from model_manager.registry import Registry
from model_manager.window_sketches import FEATURE, SCORE, WindowSketch
from model_manager.windows import MetricWindow
from tests.model_manager.monitor_support import sketch, window
from tests.model_manager.registry_support import database_url, postgres_server

__all__ = ["database_url", "postgres_server"]

T0 = 1_790_000_000.0 - (1_790_000_000.0 % BUCKET_S)  # a bucket start


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def engine(tmp_path):  # type: ignore[no-untyped-def]
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    yield registry.engine
    registry.close()


def test_merged_buckets_hold_exactly_the_counts_of_one_sketch_of_every_value(engine: sa.Engine) -> None:
    rng = np.random.default_rng(11)
    clock = Clock(T0 + 250)
    store = MonitorStore(engine, clock)
    whole = ColumnSketch("users:age")
    windows = []
    numbers: list[float] = []
    for i in range(12):
        values: list[object] = list(rng.normal(size=400))
        numbers.extend(values[9:])  # type: ignore[arg-type]
        values[:7] = [None] * 7
        values[7:9] = [float("inf"), "text"]
        whole.add(values)
        windows.append(window("churn", 2, [sketch("users:age", values)], start=T0 + 20 * i))
    assert store.add(windows) == 12
    merged = store.window("churn", 2, 300)[(FEATURE, "users:age")]
    counts = (merged.count, merged.null_count, merged.invalid_count)
    assert counts == (whole.count, whole.null_count, whole.invalid_count)
    assert merged.categories == whole.categories == {"text": 12}
    assert merged.numeric_count() == whole.numeric_count() == 12 * 391
    # The KLL merge answers every quantile within its rank error of the values' exact ranks.
    exact = np.sort(np.asarray(numbers))
    error = merged.kll.normalized_rank_error(False)
    for q in (0.01, 0.1, 0.5, 0.9, 0.99):
        rank = np.searchsorted(exact, merged.kll.get_quantile(q), side="right") / exact.size
        assert abs(rank - q) <= error


def test_windows_cover_the_buckets_they_overlap_and_no_older(engine: sa.Engine) -> None:
    clock = Clock(T0 + 3 * 3600 + 10)  # 10 s into a bucket
    store = MonitorStore(engine, clock)
    now = clock.now
    at = {  # seconds before now -> values reported then
        30: [1.0] * 5,  # this bucket
        200: [2.0] * 7,  # the previous bucket: overlaps the last 5 minutes
        400: [3.0] * 11,  # two buckets back: in 1h, not in 5m
        3700: [4.0] * 13,  # over an hour back: in 1d only
        DAY_S + 1000: [5.0] * 17,  # over a day back
    }
    store.add([window("churn", 1, [sketch("users:age", v)], start=now - ago - 5) for ago, v in at.items()])
    counts = {name: store.window("churn", 1, length)[(FEATURE, "users:age")].count for name, length in
              (("5m", 300), ("1h", 3600), ("1d", DAY_S))}  # fmt: skip
    assert counts == {"5m": 12, "1h": 23, "1d": 36}
    first, last = store.span(300, now)
    assert (first, last) == (T0 + 3 * 3600 - BUCKET_S, T0 + 3 * 3600)


def test_a_window_id_feeds_the_buckets_once_even_after_a_restart(database_url: str) -> None:
    registry = Registry.open(database_url)
    clock = Clock(T0 + 100)
    try:
        store = MonitorStore(registry.engine, clock)
        first = window("churn", 3, [sketch("users:age", [1.0, 2.0]), sketch("p", [0.5], SCORE)], start=T0, wid="w1")
        assert store.add([first, first]) == 1
        assert store.add([first]) == 0, "a retried report is counted once"
        restarted = MonitorStore(registry.engine, clock)
        assert restarted.add([first]) == 0, "the ids fed are kept with the buckets"
        second = window("churn", 3, [sketch("users:age", [3.0])], start=T0 + 30, wid="w2")
        assert restarted.add([second]) == 1
        merged = restarted.window("churn", 3, 300)
        assert merged[(FEATURE, "users:age")].count == 3
        assert merged[(SCORE, "p")].count == 1
        assert restarted.live_names("churn", T0) == {3: {"users:age", "p"}}
        # A second store on the same database (one that missed these windows in memory) skips them too.
        assert store.add([second]) == 0
    finally:
        registry.close()


def test_a_crash_between_the_ledger_and_the_store_is_made_good_at_start(engine: sa.Engine) -> None:
    clock = Clock(T0 + 100)
    store = MonitorStore(engine, clock)
    stored = [window("churn", 1, [sketch("users:age", [float(i)] * 10)], start=T0 + i) for i in range(3)]
    assert store.add(stored[:1]) == 1  # the manager stopped after storing the other two in the ledger only
    restarted = MonitorStore(engine, clock)
    assert restarted.add(stored) == 2, "the windows the ledger kept are fed at start, those fed already are not"
    assert restarted.window("churn", 1, 300)[(FEATURE, "users:age")].count == 30


def test_mirrored_windows_feed_scores_but_not_features(engine: sa.Engine) -> None:
    store = MonitorStore(engine, Clock(T0 + 100))
    shadow = window("churn", 2, [sketch("users:age", [1.0]), sketch("p", [0.2], SCORE)], start=T0, mirrored=True)
    store.add([shadow])
    assert set(store.window("churn", 2, 300)) == {(SCORE, "p")}


def test_buckets_older_than_a_day_are_pruned_in_memory_and_in_the_database(engine: sa.Engine) -> None:
    clock = Clock(T0 + 100)
    store = MonitorStore(engine, clock)
    store.add([window("churn", 1, [sketch("users:age", [1.0])], start=T0)])
    clock.now += RETENTION_S / 2
    assert store.prune() == 0
    assert store.reporting(clock.now - DAY_S) == {("churn", 1)}
    clock.now += RETENTION_S
    assert store.prune() == 1
    assert store.reporting(0) == set()
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(monitor_buckets)).scalar() == 0
    late = window("churn", 1, [sketch("users:age", [1.0])], start=T0 + 20)
    assert store.add([late]) == 0, "a window older than what is kept is not fed"


def test_stored_windows_round_trip_their_sketches_through_json() -> None:
    w = window("churn", 1, [sketch("users:age", [1.0, None, "x"]), sketch("p", [0.3], SCORE)], start=T0)
    back = MetricWindow.from_dict(w.to_dict())
    assert back == w
    assert [s.sketch.count for s in back.sketches] == [3, 1]
    assert WindowSketch.from_text(w.to_dict()["sketches"][0]).sketch.categories == {"x": 1}
