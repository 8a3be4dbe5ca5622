"""The experiment registry's tables (SQLAlchemy Core): SQLite by default, PostgreSQL in production."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

# Timestamps are microseconds since the epoch in UTC, as in the model registry.
experiments = sa.Table(
    "experiments",
    metadata,
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("model_name", sa.Text, nullable=False),
    # Guards every change: an update commits only where the version is still the one it read.
    sa.Column("version", sa.BigInteger, nullable=False),
    # The Experiment message without its phases (they live in `phases`): it evolves by adding fields.
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("created_us", sa.BigInteger, nullable=False),
    sa.Column("updated_us", sa.BigInteger, nullable=False),
)

# Every version an experiment had, as it was right after the change that made it.
experiment_versions = sa.Table(
    "experiment_versions",
    metadata,
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("version", sa.BigInteger, primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("at_us", sa.BigInteger, nullable=False),
)

phases = sa.Table(
    "experiment_phases",
    metadata,
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("number", sa.Integer, primary_key=True),
    sa.Column("started_us", sa.BigInteger, nullable=False),
    sa.Column("ended_us", sa.BigInteger, nullable=False),  # 0 while the phase is current
    sa.Column("weights", sa.JSON, nullable=False),
    sa.Column("experiment_version", sa.BigInteger, nullable=False),
)

# The weights in force per (phase, allocation): allocation 0 is the phase's own; bandits add one per re-weighting.
allocations = sa.Table(
    "experiment_allocations",
    metadata,
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("phase", sa.Integer, primary_key=True),
    sa.Column("allocation", sa.Integer, primary_key=True),
    sa.Column("weights", sa.JSON, nullable=False),
    sa.Column("experiment_version", sa.BigInteger, nullable=False),
    sa.Column("at_us", sa.BigInteger, nullable=False),
)

audit = sa.Table(
    "experiment_audit",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("key", sa.String(128), nullable=False, index=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("identity", sa.String(256), nullable=False),
    sa.Column("at_us", sa.BigInteger, nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
)

# The assignment configuration's revision: it grows with every published change, across restarts.
config_state = sa.Table(
    "config_state",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("revision", sa.BigInteger, nullable=False),
)
