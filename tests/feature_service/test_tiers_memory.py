"""The memory tier: LRU order, TTLs, negative entries, and fills that must not undo newer writes."""

from __future__ import annotations

import pytest

from feature_service.records import Record
from feature_service.tiers.memory import ABSENT, MemoryCache


class Clock:
    """A clock the test moves by hand, so TTLs are checked to the millisecond without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(value: float) -> Record:
    return Record({"x": value}, event_ts=value, written_ts=value)


def test_least_recently_used_entry_goes_first() -> None:
    cache = MemoryCache(max_entries=3)
    cache.put_many("v", [("a", record(1)), ("b", record(2)), ("c", record(3))])
    assert cache.get_many("v", ["a"]) == [record(1)]  # a is now the most recently used
    cache.put_many("v", [("d", record(4))])
    assert cache.get_many("v", ["a", "b", "c", "d"]) == [record(1), None, record(3), record(4)]
    assert cache.evictions == 1
    assert len(cache) == 3


def test_views_do_not_share_keys() -> None:
    cache = MemoryCache()
    cache.put_many("v1", [("k", record(1))])
    assert cache.get_many("v2", ["k"]) == [None]
    assert cache.get_many("v1", ["k"]) == [record(1)]


def test_entries_expire_after_their_ttl() -> None:
    clock = Clock()
    cache = MemoryCache(ttl_s=300.0, clock=clock)
    cache.put_many("v", [("k", record(1))])
    clock.now += 299.9
    assert cache.get_many("v", ["k"]) == [record(1)]
    clock.now += 0.2
    assert cache.get_many("v", ["k"]) == [None]
    assert len(cache) == 0  # an expired entry is dropped when met


def test_negative_entries_answer_absent_for_a_shorter_time() -> None:
    clock = Clock()
    cache = MemoryCache(ttl_s=300.0, negative_ttl_s=5.0, clock=clock)
    cache.put_absent("v", ["gone"])
    cache.put_many("v", [("here", record(1))])
    assert cache.get_many("v", ["gone", "here", "never"]) == [ABSENT, record(1), None]
    assert (cache.hits, cache.negative_hits, cache.misses) == (1, 1, 1)
    clock.now += 5.1
    assert cache.get_many("v", ["gone", "here"]) == [None, record(1)]


def test_a_write_replaces_a_negative_entry() -> None:
    cache = MemoryCache()
    cache.put_absent("v", ["k"])
    cache.put_many("v", [("k", record(2))])
    assert cache.get_many("v", ["k"]) == [record(2)]


def test_fill_begun_before_a_write_does_not_undo_it() -> None:
    cache = MemoryCache()
    token = cache.fill_token()  # a read starts, and goes to a lower tier...
    cache.put_many("v", [("k", record(2))])  # ...while a write stores a newer value
    cache.put_many("v", [("k", record(1)), ("other", record(1))], since=token)  # the read's old value comes back
    assert cache.get_many("v", ["k", "other"]) == [record(2), record(1)]


def test_fill_begun_before_an_invalidation_is_refused_for_those_keys() -> None:
    cache = MemoryCache()
    token = cache.fill_token()
    cache.invalidate("v", ["k"])
    cache.put_absent("v", ["k", "other"], since=token)
    assert cache.get_many("v", ["k", "other"]) == [None, ABSENT]
    later = cache.fill_token()
    cache.put_many("v", [("k", record(3))], since=later)
    assert cache.get_many("v", ["k"]) == [record(3)]


def test_fills_older_than_forgotten_changes_are_refused_whole() -> None:
    cache = MemoryCache(max_tombstones=2)
    token = cache.fill_token()
    cache.invalidate("v", ["a", "b", "c"])  # "a" falls out of the bounded record of changes
    cache.put_many("v", [("a", record(1)), ("z", record(1))], since=token)
    assert cache.get_many("v", ["a", "z"]) == [None, None]


def test_clear_refuses_fills_begun_before() -> None:
    cache = MemoryCache()
    cache.put_many("v", [("k", record(1))])
    token = cache.fill_token()
    cache.clear()
    cache.put_many("v", [("k", record(1))], since=token)
    assert cache.get_many("v", ["k"]) == [None]
    assert len(cache) == 0


def test_invalidate_view_keeps_other_views() -> None:
    cache = MemoryCache()
    cache.put_many("v1", [("k", record(1))])
    cache.put_many("v2", [("k", record(2))])
    cache.invalidate_view("v1")
    assert cache.get_many("v1", ["k"]) == [None]
    assert cache.get_many("v2", ["k"]) == [record(2)]


def test_approximate_bytes_bound_evicts() -> None:
    big = Record({"text": "x" * 10_000}, 0.0, 0.0)
    cache = MemoryCache(max_entries=1000, max_bytes=25_000)
    cache.put_many("v", [(str(i), big) for i in range(5)])
    assert len(cache) == 2
    assert 20_000 < cache.bytes <= 25_000
    cache.invalidate("v", ["3", "4"])
    assert cache.bytes == 0


def test_zero_entries_keeps_nothing() -> None:
    cache = MemoryCache(max_entries=0)
    cache.put_many("v", [("k", record(1))])
    cache.put_absent("v", ["j"])
    assert cache.get_many("v", ["k", "j"]) == [None, None]
    with pytest.raises(ValueError, match="max_entries"):
        MemoryCache(max_entries=-1)
