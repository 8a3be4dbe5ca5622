"""Long-running operations (promotions), persisted beside the registry so they outlive the manager.

Blocking (SQLAlchemy): callers use a worker thread.
"""

from __future__ import annotations

import re
import time

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from chassis.errors import InvalidArgument, NotFound
from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager.registry import database_errors

OPERATION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
metadata = sa.MetaData()

# The operation itself is its serialized message: it grows by adding fields, which old rows read as defaults.
operations = sa.Table(
    "operations",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("model_name", sa.String(128), nullable=False, index=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("done", sa.Boolean, nullable=False, index=True),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("created_us", sa.BigInteger, nullable=False),
    sa.Column("updated_us", sa.BigInteger, nullable=False),
)


def touch(operation: rpb.Operation) -> None:
    """Stamp `updated_at` now."""
    operation.updated_at.FromNanoseconds(time.time_ns())


class OperationStore:
    """Operations by id in the registry's database (their own table, created if missing)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        metadata.create_all(engine)

    @database_errors
    def insert(self, operation: rpb.Operation) -> None:
        """Record a new operation."""
        with self.engine.begin() as conn:
            conn.execute(
                operations.insert().values(
                    id=operation.operation_id,
                    kind=operation.kind,
                    model_name=operation.model_name,
                    version=operation.version,
                    done=operation.done,
                    body=operation.SerializeToString(deterministic=True),
                    created_us=operation.created_at.ToMicroseconds(),
                    updated_us=operation.updated_at.ToMicroseconds(),
                )
            )

    @database_errors
    def update(self, operation: rpb.Operation) -> None:
        """Store the operation's new state."""
        with self.engine.begin() as conn:
            conn.execute(
                operations.update()
                .where(operations.c.id == operation.operation_id)
                .values(
                    done=operation.done,
                    body=operation.SerializeToString(deterministic=True),
                    updated_us=operation.updated_at.ToMicroseconds(),
                )
            )

    @database_errors
    def get(self, operation_id: str) -> rpb.Operation:
        """One operation; NOT_FOUND if there is none with this id."""
        if not OPERATION_ID.fullmatch(operation_id):
            raise InvalidArgument(
                "operation_id: expected an operation id (up to 64 letters, digits, '_' or '-'), "
                f"got {operation_id[:80]!r}"
            )
        with self.engine.connect() as conn:
            body = conn.execute(sa.select(operations.c.body).where(operations.c.id == operation_id)).scalar()
        if body is None:
            raise NotFound(f"operation_id: no operation {operation_id!r}")
        return rpb.Operation.FromString(body)

    @database_errors
    def unfinished(self) -> list[rpb.Operation]:
        """Operations not done: at start, those a stopped or crashed manager left running."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(operations.c.body).where(operations.c.done.is_(False))).scalars().all()
        return [rpb.Operation.FromString(body) for body in rows]
