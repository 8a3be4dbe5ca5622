"""Served predictions kept for late labels, beside the registry: one row per (model, version, request id) with its
time and score, and the label once it arrives.

Same engine as the registry (SQLite or PostgreSQL). Blocking: callers run it in a worker thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from model_manager.metrics import Array
from model_manager.registry import database_errors

metadata = sa.MetaData()

MAX_REQUEST_ID = 256
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
class VersionRows:
    """A version's kept predictions: time, score and label (NaN when none yet), in one order."""

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
        if not labellings:
            return
        t = predictions.c
        with self.engine.begin() as conn:
            for item in labellings:
                query = predictions.update().where(t.request_id == item.request_id, t.label.is_(None))
                if item.model:
                    query = query.where(t.model_name == item.model)
                conn.execute(query.values(label=item.value, observed_us=item.observed_us, labelled_us=now_us))

    @database_errors
    def rows(self, model: str, version: int) -> VersionRows:
        """Every kept prediction of a version (the retention bounds how many)."""
        t = predictions.c
        query = sa.select(t.time_us, t.score, t.label).where(t.model_name == model, t.version == version)
        with self.engine.connect() as conn:
            fetched = conn.execute(query).all()
        times = np.fromiter((r.time_us for r in fetched), dtype=np.int64, count=len(fetched))
        scores = np.fromiter((r.score for r in fetched), dtype=np.float64, count=len(fetched))
        labels = np.fromiter(
            (np.nan if r.label is None else r.label for r in fetched), dtype=np.float64, count=len(fetched)
        )
        return VersionRows(times, scores, labels)

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
