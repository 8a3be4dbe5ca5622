"""Durable rollout runtime state beside the registry: rollouts, deployments, accepted metric windows, the route
revision and the last route table.

Same engine as the registry (SQLite or PostgreSQL). A rollout's change and its audit records commit in one
transaction. Blocking: callers run it in a worker thread.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from chassis.errors import InvalidArgument, NotFound
from fresco.api.models.v1 import model_manager_service_pb2 as mpb
from model_manager import pages
from model_manager.records import Page
from model_manager.registry import database_errors
from model_manager.tables import audit

metadata = sa.MetaData()

rollouts = sa.Table(
    "rollouts",
    metadata,
    sa.Column("rollout_id", sa.String(64), primary_key=True),
    sa.Column("model_name", sa.String(128), nullable=False, index=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("generation", sa.BigInteger, nullable=False),
    # True while the rollout still has versions to unload: it stays with the controller after it finished.
    sa.Column("pending_unload", sa.Boolean, nullable=False),
    sa.Column("created_us", sa.BigInteger, nullable=False, index=True),
    sa.Column("updated_us", sa.BigInteger, nullable=False),
    # The status revision: grows with every stored change, so a watch can resume after one it saw.
    sa.Column("revision", sa.BigInteger, nullable=False),
    sa.Column("initiated_by", sa.String(256), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("labels", sa.JSON, nullable=False),
    sa.Column("data", sa.JSON, nullable=False),  # Rollout.to_dict()
)

deployments = sa.Table(
    "deployments",
    metadata,
    sa.Column("model_name", sa.String(128), primary_key=True),
    sa.Column("spec", sa.LargeBinary, nullable=False),  # the Deployment message without its server-set fields
    sa.Column("generation", sa.BigInteger, nullable=False),
    sa.Column("rollout_id", sa.String(64), nullable=False),
    sa.Column("updated_by", sa.String(256), nullable=False),
    sa.Column("updated_us", sa.BigInteger, nullable=False),
)

metric_windows = sa.Table(
    "metric_windows",
    metadata,
    sa.Column("window_id", sa.String(256), primary_key=True),  # a retried report finds its id and counts once
    sa.Column("model_name", sa.String(128), nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("end_s", sa.Float, nullable=False, index=True),
    sa.Column("data", sa.JSON, nullable=False),  # MetricWindow.to_dict()
)

route_state = sa.Table(
    "route_state",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("revision", sa.BigInteger, nullable=False),
)

# The last route table published, so a restarted manager serves it again and gateways resume from its revision.
# A table of its own (not a column of route_state): create_all adds it to a database made before it existed.
route_tables = sa.Table(
    "route_tables",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("revision", sa.BigInteger, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),  # a fresco.models.v1.RouteTable message
)

DEFAULT_PAGE_SIZE = 50


def now_us() -> int:
    """Microseconds since the epoch."""
    return time.time_ns() // 1000


@dataclass(frozen=True)
class StoredRollout:
    """A rollout row: its state as `Rollout.to_dict`, its status revision and who started it why."""

    data: Mapping[str, Any]
    revision: int
    initiated_by: str
    reason: str
    labels: Mapping[str, str]


@dataclass(frozen=True)
class AuditRow:
    """One audit record to write with a rollout change."""

    identity: str
    action: str
    model_name: str
    version: int
    reason: str
    details: Mapping[str, str]


@dataclass(frozen=True)
class StoredDeployment:
    """A deployment row."""

    model_name: str
    spec: bytes
    generation: int
    rollout_id: str
    updated_by: str
    updated_us: int


class RolloutStore:
    """Rollouts, deployments, metric windows, the route revision and table over one SQLAlchemy engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        metadata.create_all(engine)

    # --- rollouts -----------------------------------------------------------------------------------------

    @database_errors
    def save(
        self,
        data: Mapping[str, Any],
        *,
        pending_unload: bool,
        audit_rows: Sequence[AuditRow] = (),
        initiated_by: str = "",
        reason: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> int:
        """Insert or update a rollout and write its audit rows in the same transaction; its new status revision."""
        rid = data["rollout_id"]
        at = now_us()
        values = {
            "model_name": data["spec"]["model"],
            "version": data["spec"]["version"],
            "state": data["state"],
            "generation": data["generation"],
            "pending_unload": pending_unload,
            "updated_us": at,
            "data": dict(data),
        }
        with self.engine.begin() as conn:
            current = conn.execute(sa.select(rollouts.c.revision).where(rollouts.c.rollout_id == rid)).scalar()
            if current is None:
                revision = 1
                conn.execute(
                    rollouts.insert().values(
                        rollout_id=rid,
                        created_us=int(data["created_at"] * 1e6),
                        revision=revision,
                        initiated_by=initiated_by,
                        reason=reason,
                        labels=dict(labels or {}),
                        **values,
                    )
                )
            else:
                revision = int(current) + 1
                conn.execute(rollouts.update().where(rollouts.c.rollout_id == rid).values(revision=revision, **values))
            for row in audit_rows:
                conn.execute(
                    audit.insert().values(
                        at_us=at,
                        identity=row.identity,
                        action=row.action,
                        model_name=row.model_name,
                        version=row.version,
                        reason=row.reason[:4096],
                        details=dict(row.details),
                    )
                )
        return revision

    @database_errors
    def get(self, rollout_id: str, field: str = "rollout_id") -> StoredRollout:
        """One rollout; NOT_FOUND if there is none with that id."""
        with self.engine.connect() as conn:
            row = conn.execute(rollouts.select().where(rollouts.c.rollout_id == rollout_id)).first()
        if row is None:
            raise NotFound(f"{field}: no rollout {rollout_id!r}")
        return _stored(row)

    @database_errors
    def latest(self, model_name: str, field: str = "model_name") -> StoredRollout:
        """The most recent rollout of a model; NOT_FOUND if it has none."""
        with self.engine.connect() as conn:
            row = conn.execute(
                rollouts.select()
                .where(rollouts.c.model_name == model_name)
                .order_by(rollouts.c.created_us.desc(), rollouts.c.rollout_id.desc())
                .limit(1)
            ).first()
        if row is None:
            raise NotFound(f"{field}: model {model_name!r} has no rollout")
        return _stored(row)

    @database_errors
    def live(self, finished: Iterable[str]) -> list[StoredRollout]:
        """Rollouts the controller still drives: not finished, or with versions left to unload; oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                rollouts.select()
                .where(rollouts.c.state.not_in(list(finished)) | rollouts.c.pending_unload)
                .order_by(rollouts.c.created_us)
            ).all()
        return [_stored(r) for r in rows]

    @database_errors
    def latest_per_model(self) -> list[StoredRollout]:
        """The most recent rollout of every model."""
        newest = (
            sa.select(rollouts.c.model_name, sa.func.max(rollouts.c.created_us).label("created_us"))
            .group_by(rollouts.c.model_name)
            .subquery()
        )
        query = rollouts.select().join(
            newest,
            (rollouts.c.model_name == newest.c.model_name) & (rollouts.c.created_us == newest.c.created_us),
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        chosen: dict[str, Any] = {}
        for row in rows:  # two rollouts of one model in the same microsecond: the greater id is the later
            if row.model_name not in chosen or row.rollout_id > chosen[row.model_name].rollout_id:
                chosen[row.model_name] = row
        return [_stored(r) for r in chosen.values()]

    @database_errors
    def page(
        self, model_name: str = "", states: Sequence[str] = (), page_size: int = 0, page_token: str = ""
    ) -> Page[StoredRollout]:
        """Rollouts newest first, optionally of one model and in some states, a page at a time."""
        size = page_size or DEFAULT_PAGE_SIZE
        query = rollouts.select()
        if model_name:
            query = query.where(rollouts.c.model_name == model_name)
        if states:
            query = query.where(rollouts.c.state.in_(list(states)))
        if page_token:
            key = pages.last_key("page_token", "r", page_token)
            created, _, rid = key.partition("/")
            if not created.isdigit() or not rid:
                raise InvalidArgument(
                    f"page_token: expected a next_page_token of ListRollouts, got {page_token[:80]!r}"
                )
            c = int(created)
            query = query.where(
                (rollouts.c.created_us < c) | ((rollouts.c.created_us == c) & (rollouts.c.rollout_id < rid))
            )
        query = query.order_by(rollouts.c.created_us.desc(), rollouts.c.rollout_id.desc()).limit(size + 1)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        items = [_stored(r) for r in rows[:size]]
        if len(rows) > size:
            last = rows[size - 1]
            return Page(items, pages.token("r", f"{last.created_us}/{last.rollout_id}"))
        return Page(items)

    # --- deployments --------------------------------------------------------------------------------------

    @database_errors
    def deployment(self, model_name: str) -> StoredDeployment | None:
        """A model's deployment as last applied, None if never applied."""
        with self.engine.connect() as conn:
            row = conn.execute(deployments.select().where(deployments.c.model_name == model_name)).first()
        return None if row is None else _deployment(row)

    @database_errors
    def put_deployment(self, deployment: StoredDeployment, previous_generation: int) -> bool:
        """Store a deployment if its generation is still `previous_generation` (0: none yet); False if it moved."""
        values = {
            "spec": deployment.spec,
            "generation": deployment.generation,
            "rollout_id": deployment.rollout_id,
            "updated_by": deployment.updated_by,
            "updated_us": deployment.updated_us,
        }
        with self.engine.begin() as conn:
            if previous_generation == 0:
                exists = conn.execute(
                    sa.select(deployments.c.generation).where(deployments.c.model_name == deployment.model_name)
                ).first()
                if exists is not None:
                    return False
                conn.execute(deployments.insert().values(model_name=deployment.model_name, **values))
                return True
            moved = conn.execute(
                deployments.update()
                .where(
                    deployments.c.model_name == deployment.model_name,
                    deployments.c.generation == previous_generation,
                )
                .values(**values)
            ).rowcount
            return bool(moved == 1)

    @database_errors
    def replicas(self, model_name: str) -> int:
        """How many predictors keep each served version of the model warm, as its deployment says (1 without one)."""
        stored = self.deployment(model_name)
        if stored is None:
            return 1
        return max(mpb.Deployment.FromString(stored.spec).replicas, 1)

    @database_errors
    def deployments_page(self, page_size: int = 0, page_token: str = "") -> Page[StoredDeployment]:
        """Deployments by model name, a page at a time."""
        size = page_size or DEFAULT_PAGE_SIZE
        query = deployments.select()
        if page_token:
            query = query.where(deployments.c.model_name > pages.last_key("page_token", "d", page_token))
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(deployments.c.model_name).limit(size + 1)).all()
        items = [_deployment(r) for r in rows[:size]]
        return Page(items, pages.token("d", items[-1].model_name) if len(rows) > size else "")

    # --- metric windows -----------------------------------------------------------------------------------

    @database_errors
    def add_windows(self, windows: Sequence[Mapping[str, Any]]) -> int:
        """Store windows (MetricWindow.to_dict) whose ids are not stored yet; how many were new."""
        if not windows:
            return 0
        ids = [w["window_id"] for w in windows]
        with self.engine.begin() as conn:
            known = set(
                conn.execute(sa.select(metric_windows.c.window_id).where(metric_windows.c.window_id.in_(ids))).scalars()
            )
            fresh = {w["window_id"]: w for w in windows if w["window_id"] not in known}
            for w in fresh.values():
                conn.execute(
                    metric_windows.insert().values(
                        window_id=w["window_id"],
                        model_name=w["model"],
                        version=w["version"],
                        end_s=w["end"],
                        data=dict(w),
                    )
                )
        return len(fresh)

    @database_errors
    def windows_since(self, end_after: float) -> list[Mapping[str, Any]]:
        """Stored windows that ended after `end_after`, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(metric_windows.c.data)
                .where(metric_windows.c.end_s > end_after)
                .order_by(metric_windows.c.end_s)
            ).scalars()
            return [dict(r) for r in rows]

    @database_errors
    def prune_windows(self, before: float) -> int:
        """Forget windows that ended at or before `before`."""
        with self.engine.begin() as conn:
            return int(conn.execute(metric_windows.delete().where(metric_windows.c.end_s <= before)).rowcount)

    # --- route revision -----------------------------------------------------------------------------------

    @database_errors
    def route_revision(self) -> int:
        """The last route revision published, 0 if none."""
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(route_state.c.revision).where(route_state.c.id == 1)).scalar() or 0)

    @database_errors
    def set_route_revision(self, revision: int) -> None:
        """Record a published route revision (never lowering it)."""
        with self.engine.begin() as conn:
            current = conn.execute(sa.select(route_state.c.revision).where(route_state.c.id == 1)).scalar()
            if current is None:
                conn.execute(route_state.insert().values(id=1, revision=revision))
            elif revision > current:
                conn.execute(route_state.update().where(route_state.c.id == 1).values(revision=revision))

    @database_errors
    def route_table(self) -> tuple[int, bytes] | None:
        """The last route table published, as (revision, RouteTable message bytes); None if none was kept."""
        with self.engine.connect() as conn:
            query = sa.select(route_tables.c.revision, route_tables.c.data).where(route_tables.c.id == 1)
            row = conn.execute(query).first()
        return None if row is None else (int(row.revision), bytes(row.data))

    @database_errors
    def set_route_table(self, revision: int, data: bytes) -> None:
        """Record a route table about to be published and its revision, in one transaction; a revision not above the
        recorded one changes nothing (as with `set_route_revision`)."""
        with self.engine.begin() as conn:
            current = conn.execute(sa.select(route_state.c.revision).where(route_state.c.id == 1)).scalar()
            if current is not None and revision <= current:
                return
            if current is None:
                conn.execute(route_state.insert().values(id=1, revision=revision))
            else:
                conn.execute(route_state.update().where(route_state.c.id == 1).values(revision=revision))
            kept = route_tables.update().where(route_tables.c.id == 1).values(revision=revision, data=data)
            if conn.execute(kept).rowcount == 0:
                conn.execute(route_tables.insert().values(id=1, revision=revision, data=data))


def _stored(row: Any) -> StoredRollout:
    return StoredRollout(dict(row.data), int(row.revision), row.initiated_by, row.reason, dict(row.labels))


def _deployment(row: Any) -> StoredDeployment:
    return StoredDeployment(
        row.model_name, bytes(row.spec), int(row.generation), row.rollout_id, row.updated_by, int(row.updated_us)
    )
