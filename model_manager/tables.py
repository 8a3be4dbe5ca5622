"""The registry's tables (SQLAlchemy Core) and how to open the database they live in: SQLite or PostgreSQL."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

metadata = sa.MetaData()

# Timestamps are microseconds since the epoch in UTC: the same integer on SQLite and PostgreSQL, no time zones.
models = sa.Table(
    "models",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("owner", sa.String(256), nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("labels", sa.JSON, nullable=False),
    sa.Column("signature", sa.LargeBinary, nullable=False),
    sa.Column("latest_version", sa.BigInteger, nullable=False),
    sa.Column("production_version", sa.BigInteger, nullable=False),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_us", sa.BigInteger, nullable=False),
    sa.Column("updated_us", sa.BigInteger, nullable=False),
)

versions = sa.Table(
    "model_versions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id"), nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("stage", sa.String(16), nullable=False),
    sa.Column("format", sa.String(32), nullable=False),
    sa.Column("framework", sa.String(128), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False, index=True),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("artifact_uri", sa.Text, nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("labels", sa.JSON, nullable=False),
    sa.Column("code_commit", sa.String(128), nullable=False),
    sa.Column("dataset_uri", sa.Text, nullable=False),
    sa.Column("dataset_sha256", sa.String(64), nullable=False, index=True),
    sa.Column("parent_version", sa.BigInteger, nullable=False),
    sa.Column("source_run", sa.String(256), nullable=False),
    sa.Column("expected_memory_bytes", sa.BigInteger, nullable=False),
    # Serialized protobuf messages: they evolve by adding fields, which old rows read as defaults.
    sa.Column("signature", sa.LargeBinary, nullable=False),
    sa.Column("training_statistics", sa.LargeBinary, nullable=False),
    sa.Column("report", sa.LargeBinary, nullable=False),
    sa.Column("backend_hints", sa.LargeBinary, nullable=False),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_us", sa.BigInteger, nullable=False),
    sa.Column("stage_updated_us", sa.BigInteger, nullable=False),
    # Two registrations of one version number cannot both commit: the loser gets an IntegrityError.
    sa.UniqueConstraint("model_id", "version", name="uq_model_versions_model_version"),
)

# The latest promotion gate results of a version, written with the stage change they decided: a serialized
# ModelVersion carrying only gate_results, so the list evolves like the message.
gate_results = sa.Table(
    "version_gate_results",
    metadata,
    sa.Column("version_id", sa.Integer, sa.ForeignKey("model_versions.id"), primary_key=True),
    sa.Column("results", sa.LargeBinary, nullable=False),
    sa.Column("updated_us", sa.BigInteger, nullable=False),
)

# The evidence a version is registered with: a serialized ModelVersion carrying only drift_policy and test_summary
# (field presence kept). A table of its own, so databases created before it gain it from create_all.
version_evidence = sa.Table(
    "version_evidence",
    metadata,
    sa.Column("version_id", sa.Integer, sa.ForeignKey("model_versions.id"), primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

aliases = sa.Table(
    "model_aliases",
    metadata,
    sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id"), primary_key=True),
    sa.Column("alias", sa.String(63), primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("updated_us", sa.BigInteger, nullable=False),
)

# How a model is served when its versions cannot: its fallback version and its static answer (a serialized
# StaticFallback). A table of its own, so databases created before it gain it from create_all.
model_serving = sa.Table(
    "model_serving",
    metadata,
    sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id"), primary_key=True),
    sa.Column("fallback_version", sa.BigInteger, nullable=False),
    sa.Column("static_fallback", sa.LargeBinary, nullable=False),
)

audit = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at_us", sa.BigInteger, nullable=False),
    sa.Column("identity", sa.String(256), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("model_name", sa.String(128), nullable=False, index=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("details", sa.JSON, nullable=False),
)


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of an SQLite file."""
    return f"sqlite+pysqlite:///{path}"


def _sqlite_pragmas(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
    # WAL lets readers run beside the writer; the busy timeout makes a second writer wait rather than fail at once.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def open_engine(url: str, tables: sa.MetaData = metadata) -> Engine:
    """An engine for `url` (sqlite+pysqlite:///file or postgresql+psycopg://...), the registry's tables (or
    `tables`, another service's) created if missing."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = sa.create_engine(url, pool_pre_ping=True)
    tables.create_all(engine)
    return engine
