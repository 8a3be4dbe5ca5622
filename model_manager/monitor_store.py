"""The value sketches gateways report, merged per model version, kind and name into 5-minute buckets, kept for a
day in the database beside the rollouts (SQLite or PostgreSQL) so a restarted manager keeps its history.

Sliding windows (5m, 1h, 1d) are merged from the buckets they overlap. Each window id feeds the buckets once: the
ids fed are stored in the same transaction as the buckets they changed, so a report retried after a crash (or the
windows a restart finds stored but not fed) counts once. Blocking: callers run it in a worker thread.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from fresco.monitoring.sketches import ColumnSketch
from model_manager.registry import database_errors
from model_manager.window_sketches import FEATURE, MAX_NAME_CHARS, SketchKey, WindowSketch
from model_manager.windows import MetricWindow

BUCKET_S = 300
DAY_S = 86_400
# A day of buckets plus two, so the 1d window always finds a whole day behind it.
RETENTION_S = DAY_S + 2 * BUCKET_S
WINDOWS: Mapping[str, int] = {"5m": 300, "1h": 3600, "1d": DAY_S}

metadata = sa.MetaData()

monitor_buckets = sa.Table(
    "monitor_buckets",
    metadata,
    sa.Column("model_name", sa.String(128), primary_key=True),
    sa.Column("version", sa.BigInteger, primary_key=True),
    sa.Column("kind", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(MAX_NAME_CHARS), primary_key=True),
    sa.Column("bucket_s", sa.BigInteger, primary_key=True, index=True),  # the bucket's start, a multiple of BUCKET_S
    sa.Column("data", sa.LargeBinary, nullable=False),  # a fresco.models.v1.ValueSketch message
)

monitor_windows = sa.Table(
    "monitor_windows",
    metadata,
    sa.Column("window_id", sa.String(256), primary_key=True),  # fed once: a retried report finds its id
    sa.Column("end_s", sa.Float, nullable=False, index=True),
)

# (model, version, kind, name)
SeriesKey = tuple[str, int, int, str]


def bucket_of(window: MetricWindow) -> int:
    """The bucket a window falls in: the one holding its midpoint."""
    middle = (window.start + window.end) / 2
    return math.floor(middle / BUCKET_S) * BUCKET_S


@dataclass
class _Series:
    """One name's buckets, and what the merge of its closed buckets (all but the latest) was last."""

    buckets: dict[int, ColumnSketch]
    closed_generation: int = 0
    cached: tuple[int, int, int, ColumnSketch] | None = None  # (first bucket, latest, generation, merged)

    def put(self, bucket: int, sketch: ColumnSketch) -> None:
        latest = max(self.buckets, default=None)
        if latest is not None and bucket != latest:  # a closed bucket changed, or the latest just closed
            self.closed_generation += 1
        self.buckets[bucket] = sketch

    def merged(self, first: int, last: int) -> ColumnSketch | None:
        """The buckets in [first, last] merged into a fresh sketch; None when there are none."""
        inside = sorted(b for b in self.buckets if first <= b <= last)
        if not inside:
            return None
        latest = inside[-1]
        cached = self.cached
        if cached is not None and cached[:3] == (first, latest, self.closed_generation):
            closed = cached[3]
        else:
            closed = ColumnSketch(self.buckets[latest].name, self.buckets[latest].kind)
            for b in inside[:-1]:
                closed.merge(self.buckets[b])
            self.cached = (first, latest, self.closed_generation, closed)
        out = closed.copy()
        out.merge(self.buckets[latest])
        return out


class MonitorStore:
    """Merged value sketches per (model, version, kind, name) and 5-minute bucket, in memory and in the database."""

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.clock = clock
        self._lock = threading.Lock()
        self._series: dict[SeriesKey, _Series] = {}
        self._fed: dict[str, float] = {}  # window id -> end
        self._horizon = -math.inf
        metadata.create_all(engine)
        self._load()

    @database_errors
    def _load(self) -> None:
        since = self.clock() - RETENTION_S
        with self.engine.connect() as conn:
            rows = conn.execute(monitor_buckets.select().where(monitor_buckets.c.bucket_s > since - BUCKET_S)).all()
            ids = conn.execute(
                sa.select(monitor_windows.c.window_id, monitor_windows.c.end_s).where(monitor_windows.c.end_s > since)
            ).all()
        for row in rows:
            sketch = WindowSketch.from_bytes(bytes(row.data)).sketch
            key = (row.model_name, int(row.version), int(row.kind), row.name)
            self._series.setdefault(key, _Series({})).buckets[int(row.bucket_s)] = sketch
        self._fed = {row.window_id: float(row.end_s) for row in ids}
        self._horizon = since

    def __contains__(self, window_id: str) -> bool:
        with self._lock:
            return window_id in self._fed

    # --- writing ------------------------------------------------------------------------------------------

    @database_errors
    def add(self, windows: Iterable[MetricWindow]) -> int:
        """Feeds windows not fed before into their buckets, stored in one transaction; how many were fed.

        A mirrored window's feature sketches are left out: they are copies of live requests counted already."""
        with self._lock:
            fresh: dict[str, MetricWindow] = {}
            for w in windows:  # a window without sketches has nothing to merge: no id to keep either
                if w.sketches and w.window_id not in self._fed and w.window_id not in fresh and w.end > self._horizon:
                    fresh[w.window_id] = w
            if not fresh:
                return 0
            with self.engine.begin() as conn:
                known = conn.execute(
                    sa.select(monitor_windows.c.window_id).where(monitor_windows.c.window_id.in_(list(fresh)))
                ).scalars()
                for window_id in known:  # fed by another process sharing the database; this one reloads at start
                    del fresh[window_id]
                if not fresh:
                    return 0
                changed = self._merged_into_copies(fresh.values())
                conn.execute(monitor_windows.insert(), [{"window_id": k, "end_s": w.end} for k, w in fresh.items()])
                for (key, bucket), sketch in changed.items():
                    self._write_bucket(conn, key, bucket, sketch)
            for (key, bucket), sketch in changed.items():
                self._series.setdefault(key, _Series({})).put(bucket, sketch)
            self._fed.update({k: w.end for k, w in fresh.items()})
            return len(fresh)

    def _merged_into_copies(self, windows: Iterable[MetricWindow]) -> dict[tuple[SeriesKey, int], ColumnSketch]:
        """The buckets the windows change, as they will be: copies, so memory changes only once stored."""
        changed: dict[tuple[SeriesKey, int], ColumnSketch] = {}
        for w in windows:
            bucket = bucket_of(w)
            for s in w.sketches:
                if w.mirrored and s.kind == FEATURE:
                    continue
                slot = ((w.model, w.version, s.kind, s.name), bucket)
                target = changed.get(slot)
                if target is None:
                    series = self._series.get(slot[0])
                    current = series.buckets.get(bucket) if series is not None else None
                    target = changed[slot] = current.copy() if current is not None else ColumnSketch(s.name, s.kind)
                target.merge(s.sketch)
        return changed

    @staticmethod
    def _write_bucket(conn: Connection, key: SeriesKey, bucket: int, sketch: ColumnSketch) -> None:
        model, version, kind, name = key
        data = sketch.to_proto().SerializeToString(deterministic=True)
        where = (
            (monitor_buckets.c.model_name == model)
            & (monitor_buckets.c.version == version)
            & (monitor_buckets.c.kind == kind)
            & (monitor_buckets.c.name == name)
            & (monitor_buckets.c.bucket_s == bucket)
        )
        if conn.execute(monitor_buckets.update().where(where).values(data=data)).rowcount == 0:
            conn.execute(
                monitor_buckets.insert().values(
                    model_name=model, version=version, kind=kind, name=name, bucket_s=bucket, data=data
                )
            )

    @database_errors
    def prune(self) -> int:
        """Forgets buckets and window ids older than a day (plus margin); how many buckets went."""
        now = self.clock()
        horizon = now - RETENTION_S
        first_kept = math.floor(horizon / BUCKET_S) * BUCKET_S
        with self._lock:
            with self.engine.begin() as conn:
                conn.execute(monitor_windows.delete().where(monitor_windows.c.end_s <= horizon))
                gone = conn.execute(monitor_buckets.delete().where(monitor_buckets.c.bucket_s < first_kept)).rowcount
            for key in list(self._series):
                series = self._series[key]
                old = [b for b in series.buckets if b < first_kept]
                for b in old:
                    del series.buckets[b]
                if old:
                    series.closed_generation += 1
                if not series.buckets:
                    del self._series[key]
            self._fed = {k: end for k, end in self._fed.items() if end > horizon}
            self._horizon = max(self._horizon, horizon)
        return int(gone)

    # --- reading ------------------------------------------------------------------------------------------

    def window(
        self, model: str, version: int, length_s: float, now: float | None = None
    ) -> dict[SketchKey, ColumnSketch]:
        """Each (kind, name) of a version merged over the buckets that overlap (now - length_s, now]."""
        first, last = self.span(length_s, self.clock() if now is None else now)
        out: dict[SketchKey, ColumnSketch] = {}
        with self._lock:
            for (m, v, kind, name), series in self._series.items():
                if m == model and v == version:
                    merged = series.merged(first, last)
                    if merged is not None:
                        out[(kind, name)] = merged
        return out

    def across_versions(
        self, model: str, kind: int, names: Iterable[str], length_s: float, now: float | None = None
    ) -> dict[str, ColumnSketch]:
        """Each name of one kind merged over every version of a model and the window's buckets."""
        wanted = set(names)
        first, last = self.span(length_s, self.clock() if now is None else now)
        out: dict[str, ColumnSketch] = {}
        with self._lock:
            for (m, _, k, name), series in self._series.items():
                if m != model or k != kind or name not in wanted:
                    continue
                merged = series.merged(first, last)
                if merged is None:
                    continue
                if name in out:
                    out[name].merge(merged)
                else:
                    out[name] = merged
        return out

    def buckets(self, model: str, version: int, key: SketchKey) -> dict[int, ColumnSketch]:
        """One name's buckets by start (the sketches are shared: read them, do not change them)."""
        with self._lock:
            series = self._series.get((model, version, *key))
            return dict(series.buckets) if series is not None else {}

    def versions(self, model: str, since_s: float) -> list[int]:
        """The versions of a model with a bucket at or after `since_s`, newest first."""
        return sorted(self.live_names(model, since_s), reverse=True)

    def live_names(self, model: str, since_s: float) -> dict[int, set[str]]:
        """The names (features and scores) with sketches per version since a time."""
        start = math.floor(since_s / BUCKET_S) * BUCKET_S
        out: dict[int, set[str]] = {}
        with self._lock:
            for (m, v, _, name), series in self._series.items():
                if m == model and any(b >= start for b in series.buckets):
                    out.setdefault(v, set()).add(name)
        return out

    def reporting(self, since_s: float) -> set[tuple[str, int]]:
        """Every (model, version) with a bucket at or after `since_s`."""
        start = math.floor(since_s / BUCKET_S) * BUCKET_S
        with self._lock:
            return {(m, v) for (m, v, _, _), s in self._series.items() if any(b >= start for b in s.buckets)}

    @staticmethod
    def span(length_s: float, now: float) -> tuple[int, int]:
        """The first and last bucket starts a window of `length_s` ending `now` overlaps."""
        last = math.floor(now / BUCKET_S) * BUCKET_S
        first = math.floor((now - length_s) / BUCKET_S) * BUCKET_S
        return first, last
