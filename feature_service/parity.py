"""Online-offline parity: a share of the entities GetFeatures serves (chosen by a hash of the entity key, so
the same ones every time and the offline index only holds those) is queued off the request path and compared,
value by value, with what the offline path gives for the same entity and time: the latest row at or before
the served time in the files the view was materialised from, resolved by `fresco.features.resolve_rows` with
the baselines the online answer used. Counted per feature as match, mismatch or missing_offline.

missing_offline: the offline files hold no row for the record served, either none at or before the time, or
the served record is newer than every offline row then (it was pushed after materialisation, or came from a
source no longer remembered). Such a value may legitimately differ from the files, so it is not compared.
A served record older than the files' latest row, or a missing or expired one where the files have a live
row, is compared: serving stale or lost data is what parity is for."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
from prometheus_client import CollectorRegistry, Counter

from chassis.errors import InvalidArgument
from feature_service import convert
from feature_service.materialize import Materializer
from feature_service.offline_index import OfflineIndex, OfflineRow, build_index, empty_index, sources_of
from feature_service.reader import Catalog, Column, FeatureQuery, Served, ServedViews, ViewEntry
from feature_service.records import Record, micros
from fresco.api.features.v1 import statistics_pb2 as spb
from fresco.features.definitions import Definitions, FeatureView
from fresco.features.policy import Baseline, resolve_rows

log = logging.getLogger(__name__)

EXAMPLES = 5
"""Recent mismatches kept per feature."""
MATCH, MISMATCH, MISSING_OFFLINE = "match", "mismatch", "missing_offline"
REL_TOL, ABS_TOL = 1e-9, 1e-12
_UNAVAILABLE = int(Served.UNAVAILABLE)


@dataclass(frozen=True)
class Sample:
    """One served entity of one view: what was served, when, and under which statistics and TTL."""

    view: str
    key: str
    served_at: float
    event_ts: float | None  # the served record's event time; None when no record was found
    written_ts: float | None  # its arrival: a materialisation's rows all carry that materialisation's time
    ttl: float | None
    impute: bool
    stored: bytes | None  # the view's statistics blob the answer was served under (its sources and baselines)
    baselines: Mapping[str, Baseline]
    values: Mapping[str, Any]  # feature → served value


@dataclass
class Counts:
    """One feature's parity so far."""

    checked: int = 0
    mismatched: int = 0
    missing_offline: int = 0
    examples: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=EXAMPLES))


def same(online: Any, offline: Any) -> bool:
    """Whether a served value equals the offline one: floats within a tight tolerance, lists element-wise,
    bools only as bools, everything else exactly."""
    if online is None or offline is None:
        return online is None and offline is None
    if isinstance(online, bool) or isinstance(offline, bool):
        return type(online) is type(offline) and online == offline
    if isinstance(online, int) and isinstance(offline, int):
        return online == offline
    if isinstance(online, (int, float)) and isinstance(offline, (int, float)):
        if math.isnan(online) or math.isnan(offline):
            return math.isnan(online) and math.isnan(offline)
        return math.isclose(online, offline, rel_tol=REL_TOL, abs_tol=ABS_TOL)
    if isinstance(online, (list, tuple)) and isinstance(offline, (list, tuple)):
        return len(online) == len(offline) and all(same(a, b) for a, b in zip(online, offline, strict=True))
    return bool(online == offline)


class ParityChecker:
    """Samples served answers into a bounded queue, checks them in one background task, keeps the counts."""

    def __init__(
        self,
        catalog: Catalog,
        materializer: Materializer,
        registry: CollectorRegistry | None = None,
        *,
        sample_rate: float = 0.01,
        queue_size: int = 10_000,
        max_entities: int = 100_000,
        offline_views: Mapping[str, FeatureView] | None = None,
    ) -> None:
        """offline_views: the definitions the offline side resolves with, by view (default: the served ones)."""
        self.catalog = catalog
        self.materializer = materializer
        self.sample_rate = sample_rate
        self.threshold = round(sample_rate * 2**32)  # crc32 of the key below this: sampled
        self.max_entities = max_entities
        self.offline_views = dict(offline_views or {})
        self.queue: asyncio.Queue[Sample] = asyncio.Queue(queue_size)
        self.counts: dict[tuple[str, str], Counts] = {}
        self.indexes: dict[str, OfflineIndex] = {}
        self._task: asyncio.Task[None] | None = None
        self.checks = Counter(
            "fresco_feature_parity_checks",
            "Sampled served feature values compared with the offline path, by view, feature and outcome "
            "(match, mismatch, missing_offline).",
            ["view", "feature", "outcome"],
            registry=registry,
        )
        self.dropped = Counter(
            "fresco_feature_parity_samples_dropped",
            "Sampled entities not checked, by reason (queue_full; stale: served under statistics or a time the "
            "offline index no longer covers; not_indexed: beyond the index's max entities; error).",
            ["reason"],
            registry=registry,
        )
        self._children: dict[tuple[str, str, str], Any] = {}
        self._queue_full = self.dropped.labels("queue_full")

    # --- the request path -----------------------------------------------------------------------------

    def sampled(self, key: str) -> bool:
        """Whether an entity's values are checked: a fixed hash of its storage key, so always the same ones."""
        return zlib.crc32(key.encode()) < self.threshold

    def offer(self, query: FeatureQuery, served: ServedViews, columns: Sequence[Column], now: float) -> None:
        """Queue the sampled entities of an answer; never blocks or raises (a full queue drops, counted)."""
        if self.threshold <= 0:
            return
        try:
            self._offer(query, served, columns, now)
        except Exception:  # the answer must go out whatever happens here
            log.exception("parity: sampling an answer failed")
            self.dropped.labels("error").inc()

    def _offer(self, query: FeatureQuery, served: ServedViews, columns: Sequence[Column], now: float) -> None:
        by_view: dict[str, list[int]] = {}  # the columns of each view, listed once an entity is sampled
        for view, keys in query.keys_by_view.items():
            if self.threshold >= 2**32:
                chosen: Sequence[int] = range(len(keys))
            else:  # inlined: this runs for every entity of every answer
                crc32, threshold = zlib.crc32, self.threshold
                chosen = [i for i, key in enumerate(keys) if crc32(key.encode()) < threshold]
            if not chosen:
                continue
            if not by_view:
                for j, ref in enumerate(query.refs):
                    by_view.setdefault(ref.view.view.name, []).append(j)
            refs = by_view[view]
            entry, seen = query.refs[refs[0]].view, served[view]
            for i in chosen:
                if columns[refs[0]].statuses[i] == _UNAVAILABLE:  # nothing was served to compare
                    continue
                if self.queue.full():  # before building the sample: an overloaded checker costs the answer nothing
                    self._queue_full.inc()
                    continue
                record = seen.records[i]
                event_ts, written_ts = (
                    (record.event_ts, record.written_ts) if isinstance(record, Record) else (None, None)
                )
                values = {query.refs[j].feature.name: columns[j].values[i] for j in refs}
                sample = Sample(
                    view,
                    keys[i],
                    now,
                    event_ts,
                    written_ts,
                    seen.ttl,
                    query.impute,
                    entry.stored,
                    entry.baselines,
                    values,
                )
                self.queue.put_nowait(sample)  # not full: nothing else runs in between

    # --- the background check -------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="parity check")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            sample = await self.queue.get()
            try:
                await self.check(sample)
            except Exception:  # the checker must outlive any one sample
                log.exception("parity: checking a sample of %s failed", sample.view)
                self.dropped.labels("error").inc()

    async def check(self, sample: Sample) -> None:
        """Compare one sample with the offline path and count the outcome of each of its features."""
        entry = self.catalog.views[sample.view]
        if sample.stored != entry.stored:  # a materialisation landed since: its sources are not what was served
            self.dropped.labels("stale").inc()
            return
        index = await self._index(entry)
        if sample.served_at < index.kept_from:
            self.dropped.labels("stale").inc()
            return
        if not index.holds(sample.key):
            self.dropped.labels("not_indexed").inc()
            return
        # A record dated ahead of the clock (accepted within max_future_s) is served already: look up to it.
        at = max(sample.served_at, sample.event_ts or sample.served_at)
        row = index.lookup(sample.key, at)
        if row is None or self._not_from_files(sample, index, row):
            for name in sample.values:
                self._count(sample.view, name, MISSING_OFFLINE)
            return
        expected = self._offline_values(entry, index, row, sample)
        for name, online in sample.values.items():
            offline = expected.get(name)
            if same(online, offline):
                self._count(sample.view, name, MATCH)
                continue
            self._count(sample.view, name, MISMATCH)
            entity = _entity(entry, sample.key)
            self.counts[(sample.view, name)].examples.append(
                f"{entity} at {convert.utc(sample.served_at)}: online {online!r}, offline {offline!r} "
                f"(offline row of {convert.utc(row.event_ts)})"
            )

    @staticmethod
    def _not_from_files(sample: Sample, index: OfflineIndex, row: OfflineRow) -> bool:
        """Whether the served record is one the files do not hold though they have a row then: newer than the
        row, or as new but not written by a materialisation read here (a push with the same event time wins
        by its later arrival)."""
        if sample.event_ts is None or sample.written_ts is None:
            return False
        served, offline = micros(sample.event_ts), micros(row.event_ts)
        return served > offline or (served == offline and micros(sample.written_ts) not in index.arrivals)

    def _offline_values(self, entry: ViewEntry, index: OfflineIndex, row: OfflineRow, sample: Sample) -> dict[str, Any]:
        """The offline row as served at the sample's time: expired by the same TTL rule, resolved by policy."""
        expired = sample.ttl is not None and sample.served_at - row.event_ts > sample.ttl
        values = {} if expired else dict(zip(index.names, row.values, strict=True))
        if not sample.impute:
            return values
        view = self.offline_views.get(entry.view.name, entry.view)
        return resolve_rows(view, [values], sample.baselines)[0]

    async def _index(self, entry: ViewEntry) -> OfflineIndex:
        """The view's offline index for its current statistics, built (in a thread) when they changed."""
        index = self.indexes.get(entry.view.name)
        if index is not None and index.stored == entry.stored:
            return index
        sources = sources_of(entry)
        if sources:
            index = await asyncio.to_thread(
                build_index, entry, sources, self.materializer, self.sampled, self.max_entities
            )
        else:
            index = empty_index(entry)
        self.indexes[entry.view.name] = index
        return index

    def _count(self, view: str, feature: str, outcome: str) -> None:
        counts = self.counts.get((view, feature))
        if counts is None:
            counts = self.counts[(view, feature)] = Counts()
        counts.checked += 1
        if outcome == MISMATCH:
            counts.mismatched += 1
        elif outcome == MISSING_OFFLINE:
            counts.missing_offline += 1
        child = self._children.get((view, feature, outcome))
        if child is None:
            child = self._children[(view, feature, outcome)] = self.checks.labels(view, feature, outcome)
        child.inc()

    # --- the answer -----------------------------------------------------------------------------------

    def parity(self, view: str, feature: str) -> spb.FeatureParity:
        """One feature's counts (zeros if none of its values was checked yet)."""
        counts = self.counts.get((view, feature)) or Counts()
        return spb.FeatureParity(
            feature_ref=f"{view}:{feature}",
            checked=counts.checked,
            mismatched=counts.mismatched,
            missing_offline=counts.missing_offline,
            examples=list(counts.examples),
        )

    def checked(self) -> list[tuple[str, str]]:
        """Every (view, feature) checked so far, by view name then the view's feature order."""
        order = {
            (name, f.name): (name, i)
            for name, entry in self.catalog.views.items()
            for i, f in enumerate(entry.view.features)
        }
        return sorted(self.counts, key=lambda pair: order.get(pair, (pair[0], 0)))


def offline_views(catalog: Catalog, offline: Definitions, source: str) -> dict[str, FeatureView]:
    """The views the offline side resolves with, from another definitions file: every served view and feature
    must be in it (InvalidArgument naming the file and what is missing)."""
    views = {}
    for name, entry in catalog.views.items():
        view = offline.view(name)
        if view is None:
            raise InvalidArgument(f"{source}: view {name!r} is served but not defined (parity_offline_definitions)")
        if missing := [f for f in entry.features if view.feature(f) is None]:
            raise InvalidArgument(
                f"{source}: view {name!r} lacks served feature(s) {missing} (parity_offline_definitions)"
            )
        views[name] = view
    return views


def _entity(entry: ViewEntry, key: str) -> str:
    """An entity key as its join keys, e.g. customer_id=42."""
    values = msgpack.unpackb(bytes.fromhex(key), raw=False)
    return ", ".join(f"{k.name}={v!r}" for k, v in zip(entry.join_keys, values, strict=False))
