"""Version holds: versions of a model kept loaded and routable at weight 0 for a holder (an experiment's arms),
reachable only by requests pinned to them. Persisted beside the registry, each change audited.

Blocking (SQLAlchemy): callers use a worker thread.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from chassis.errors import FailedPrecondition, FrescoError, InvalidArgument
from fresco.api.models.v1 import model_manager_service_pb2 as mpb
from model_manager.lifecycle import Stage
from model_manager.registry import Registry, database_errors
from model_manager.tables import audit

HOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}")
MAX_VERSIONS = 16
metadata = sa.MetaData()

holds = sa.Table(
    "version_holds",
    metadata,
    sa.Column("model_name", sa.String(128), primary_key=True),
    sa.Column("holder", sa.String(128), primary_key=True),
    sa.Column("versions", sa.JSON, nullable=False),
    sa.Column("updated_by", sa.String(256), nullable=False),
    sa.Column("updated_us", sa.BigInteger, nullable=False),
)


class HoldStore:
    """Holds by (model, holder) in the registry's database (their own table, created if missing)."""

    def __init__(self, engine: Engine, registry: Registry) -> None:
        self.engine = engine
        self.registry = registry
        metadata.create_all(engine)

    @database_errors
    def set(
        self, model: str, holder: str, versions: Sequence[int], identity: str, reason: str
    ) -> list[mpb.VersionHold]:
        """Set `holder`'s hold on `model` (none releases it), audited; every hold on the model afterwards.

        INVALID_ARGUMENT names a malformed field; NOT_FOUND an unknown model or version; FAILED_PRECONDITION a
        version that was rejected (it may not serve)."""
        if not HOLDER.fullmatch(holder):
            raise InvalidArgument(f"holder: expected 1-128 of [A-Za-z0-9_.:/-] starting alphanumeric, got {holder!r}")
        wanted = sorted(set(versions))
        if len(wanted) > MAX_VERSIONS:
            raise InvalidArgument(f"versions: expected at most {MAX_VERSIONS} versions, got {len(wanted)}")
        self.registry.get_model(model)  # NOT_FOUND for an unknown model
        for i, version in enumerate(wanted):
            if version <= 0:
                raise InvalidArgument(f"versions[{i}]: expected a positive version number, got {version}")
            stage = self.registry.get_version(model, version).stage
            if stage is Stage.REJECTED:
                raise FailedPrecondition(f"versions[{i}]: {model} v{version} failed a promotion gate: it may not serve")
        at = time.time_ns() // 1000
        key = (holds.c.model_name == model) & (holds.c.holder == holder)
        with self.engine.begin() as conn:
            conn.execute(holds.delete().where(key))
            if wanted:
                conn.execute(
                    holds.insert().values(
                        model_name=model, holder=holder, versions=wanted, updated_by=identity, updated_us=at
                    )
                )
            conn.execute(
                audit.insert().values(
                    at_us=at,
                    identity=identity,
                    action="model.hold" if wanted else "model.release",
                    model_name=model,
                    version=0,
                    reason=reason[:4096],
                    details={"holder": holder, "versions": ",".join(map(str, wanted))},
                )
            )
        return self.of(model)

    @database_errors
    def of(self, model: str) -> list[mpb.VersionHold]:
        """Every hold on `model`, by holder."""
        with self.engine.connect() as conn:
            rows = conn.execute(holds.select().where(holds.c.model_name == model).order_by(holds.c.holder)).all()
        out = []
        for row in rows:
            hold = mpb.VersionHold(
                model_name=row.model_name, holder=row.holder, versions=list(row.versions), updated_by=row.updated_by
            )
            hold.updated_at.FromMicroseconds(int(row.updated_us))
            out.append(hold)
        return out

    @database_errors
    def held(self) -> dict[str, frozenset[int]]:
        """Each model's held versions that may serve, over all holders."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(holds.c.model_name, holds.c.versions)).all()
        out: dict[str, set[int]] = {}
        for model, versions in rows:
            out.setdefault(model, set()).update(int(v) for v in versions)
        return {model: frozenset(v for v in versions if self._may_serve(model, v)) for model, versions in out.items()}

    def _may_serve(self, model: str, version: int) -> bool:
        """A held version its gates rejected since (or that is gone) leaves the routes: arms never reach it."""
        try:
            return self.registry.get_version(model, version).stage is not Stage.REJECTED
        except FrescoError:
            return False
