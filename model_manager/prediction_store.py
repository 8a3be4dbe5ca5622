"""Served predictions kept for late labels, beside the registry: one row per (model, version, request id) with its
time and score, and the label once it arrives.

Same engine as the registry (SQLite or PostgreSQL). Blocking: callers run it in a worker thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from model_manager.metrics import Array
from model_manager.registry import database_errors

metadata = sa.MetaData()

MAX_REQUEST_ID = 256


def storable_id(request_id: str) -> bool:
    """Whether a request id can be a key here: not empty, at most MAX_REQUEST_ID characters, and no NUL (which
    PostgreSQL text cannot hold)."""
    return 0 < len(request_id) <= MAX_REQUEST_ID and "\x00" not in request_id


# Rows per statement when reading by request id: far below SQLite's and PostgreSQL's bound-parameter limits.
LOOKUP_CHUNK = 500

# Times are microseconds since the epoch in UTC, as in the registry's tables.
predictions = sa.Table(
    "prediction_records",
    metadata,
    sa.Column("model_name", sa.String(128), primary_key=True),
    sa.Column("version", sa.BigInteger, primary_key=True),
    # A retried report, or an id a caller reused, finds the row there: the first prediction is kept.
    sa.Column("request_id", sa.String(MAX_REQUEST_ID), primary_key=True),
    sa.Column("time_us", sa.BigInteger, nullable=False, index=True),
    sa.Column("score", sa.Double, nullable=False),
    # The predictive entropy of the score read as a probability, so a window's mean is one SQL aggregate.
    sa.Column("entropy", sa.Double, nullable=False),
    sa.Column("unit_id", sa.String(256), nullable=False),
    sa.Column("label", sa.Double, nullable=True),  # NULL until the label arrives
    sa.Column("observed_us", sa.BigInteger, nullable=True),
    sa.Column("labelled_us", sa.BigInteger, nullable=True),
    sa.Index("ix_prediction_records_request", "request_id"),
    sa.Index("ix_prediction_records_version_time", "model_name", "version", "time_us"),
)


@dataclass(frozen=True)
class Prediction:
    """One served prediction as a gateway recorded it."""

    model: str
    version: int
    request_id: str
    time_us: int
    score: float
    entropy: float
    unit_id: str = ""


@dataclass(frozen=True)
class Match:
    """A kept prediction a label's request id names, and its label if it has one."""

    model: str
    version: int
    label: float | None


@dataclass(frozen=True)
class Labelling:
    """One accepted label to write: the predictions of `request_id` (of `model` only, unless empty) get `value`."""

    request_id: str
    model: str
    value: float
    observed_us: int


@dataclass(frozen=True)
class Summary:
    """Aggregates of a version's predictions: (count, entropy sum) per window asked for; the smallest and largest
    score, the number of labels other than 0 and 1, and the earliest time, over the widest window (None if empty)."""

    windows: list[tuple[int, float]]
    min_score: float | None
    max_score: float | None
    non_binary_labels: int
    earliest_us: int | None


@dataclass(frozen=True)
class VersionRows:
    """Labelled predictions of a version: time, score and label, in one order."""

    time_us: npt.NDArray[np.int64]
    score: Array
    label: Array


class PredictionStore:
    """Kept predictions and their labels over one SQLAlchemy engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        metadata.create_all(engine)

    @database_errors
    def add(self, rows: Sequence[Prediction]) -> None:
        """Keep predictions whose (model, version, request id) is not kept yet; the first one of an id wins."""
        fresh: dict[tuple[str, int, str], Prediction] = {}
        for p in rows:
            fresh.setdefault((p.model, p.version, p.request_id), p)
        if not fresh:
            return
        values = [
            {
                "model_name": p.model,
                "version": p.version,
                "request_id": p.request_id,
                "time_us": p.time_us,
                "score": p.score,
                "entropy": p.entropy,
                "unit_id": p.unit_id,
            }
            for p in fresh.values()
        ]
        with self.engine.begin() as conn:
            conn.execute(_insert_new(conn), values)

    @database_errors
    def matches(self, request_ids: Iterable[str], model: str = "") -> dict[str, list[Match]]:
        """The kept predictions of each request id (of `model` only, unless empty); ids with none are absent."""
        ids = sorted(set(request_ids))
        found: dict[str, list[Match]] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(ids), LOOKUP_CHUNK):
                t = predictions.c
                query = sa.select(t.request_id, t.model_name, t.version, t.label).where(
                    t.request_id.in_(ids[i : i + LOOKUP_CHUNK])
                )
                if model:
                    query = query.where(t.model_name == model)
                for row in conn.execute(query):
                    label = None if row.label is None else float(row.label)
                    found.setdefault(row.request_id, []).append(Match(row.model_name, int(row.version), label))
        return found

    @database_errors
    def write_labels(self, labellings: Sequence[Labelling], now_us: int) -> None:
        """Give each labelling's unlabelled predictions its value, all in one transaction (durable when it returns)."""
        t = predictions.c
        with self.engine.begin() as conn:
            for model in sorted({item.model for item in labellings}):
                query = predictions.update().where(t.request_id == sa.bindparam("rid"), t.label.is_(None))
                if model:
                    query = query.where(t.model_name == model)
                values = [
                    {"rid": i.request_id, "value": i.value, "observed": i.observed_us}
                    for i in labellings
                    if i.model == model
                ]
                fields = {
                    "label": sa.bindparam("value"),
                    "observed_us": sa.bindparam("observed"),
                    "labelled_us": now_us,
                }
                conn.execute(query.values(fields), values)

    @database_errors
    def labelled(self, model: str, version: int, since_us: int | None = None) -> VersionRows:
        """The labelled predictions of a version made at or after `since_us` (all when None)."""
        t = predictions.c
        query = sa.select(t.time_us, t.score, t.label).where(
            t.model_name == model, t.version == version, t.label.is_not(None)
        )
        if since_us is not None:
            query = query.where(t.time_us >= since_us)
        with self.engine.connect() as conn:
            fetched = conn.execute(query).all()
        times = np.fromiter((r.time_us for r in fetched), dtype=np.int64, count=len(fetched))
        scores = np.fromiter((r.score for r in fetched), dtype=np.float64, count=len(fetched))
        labels = np.fromiter((r.label for r in fetched), dtype=np.float64, count=len(fetched))
        return VersionRows(times, scores, labels)

    @database_errors
    def summary(self, model: str, version: int, starts: Sequence[int | None]) -> Summary:
        """Counts and entropy sums of a version's predictions made at or after each start (None: all), and what its
        task is inferred from, over the widest of them; one aggregate query."""
        t = predictions.c
        columns: list[sa.ColumnElement[Any]] = []
        for start in starts:
            inside = sa.true() if start is None else t.time_us >= start
            columns.append(sa.func.coalesce(sa.func.sum(sa.case((inside, 1), else_=0)), 0))
            columns.append(sa.func.coalesce(sa.func.sum(sa.case((inside, t.entropy), else_=0.0)), 0.0))
        not_binary = sa.and_(t.label.is_not(None), t.label != 0.0, t.label != 1.0)
        columns += [
            sa.func.min(t.score),
            sa.func.max(t.score),
            sa.func.coalesce(sa.func.sum(sa.case((not_binary, 1), else_=0)), 0),
            sa.func.min(t.time_us),
        ]
        query = sa.select(*columns).where(t.model_name == model, t.version == version)
        if None not in starts and starts:
            query = query.where(t.time_us >= min(s for s in starts if s is not None))
        with self.engine.connect() as conn:
            row = conn.execute(query).one()
        n = 2 * len(starts)
        windows = [(int(row[i]), float(row[i + 1])) for i in range(0, n, 2)]
        low, high, non_binary, earliest = row[n], row[n + 1], int(row[n + 2]), row[n + 3]
        return Summary(
            windows,
            None if low is None else float(low),
            None if high is None else float(high),
            non_binary,
            None if earliest is None else int(earliest),
        )

    @database_errors
    def versions(self, model: str) -> list[int]:
        """The versions of a model with predictions kept, newest first."""
        t = predictions.c
        query = sa.select(t.version).where(t.model_name == model).distinct().order_by(t.version.desc())
        with self.engine.connect() as conn:
            return [int(v) for v in conn.execute(query).scalars()]

    @database_errors
    def recent(self, since_us: int) -> list[tuple[str, int]]:
        """The (model, version) pairs with a prediction at or after `since_us`."""
        t = predictions.c
        query = sa.select(t.model_name, t.version).where(t.time_us >= since_us).distinct()
        with self.engine.connect() as conn:
            return sorted((r.model_name, int(r.version)) for r in conn.execute(query))

    @database_errors
    def prune(self, before_us: int) -> int:
        """Forget predictions (and their labels) made before `before_us`; how many."""
        with self.engine.begin() as conn:
            return int(conn.execute(predictions.delete().where(predictions.c.time_us < before_us)).rowcount)


def _insert_new(conn: Connection) -> sa.Insert:
    # INSERT ... ON CONFLICT DO NOTHING: a concurrent report of the same prediction neither fails nor overwrites.
    keys = ["model_name", "version", "request_id"]
    if conn.dialect.name == "postgresql":
        return postgresql.insert(predictions).on_conflict_do_nothing(index_elements=keys)
    if conn.dialect.name == "sqlite":
        return sqlite.insert(predictions).on_conflict_do_nothing(index_elements=keys)
    raise NotImplementedError(f"predictions are kept on SQLite or PostgreSQL, not {conn.dialect.name}")
