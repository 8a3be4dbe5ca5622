"""The experiment registry's storage: experiments, their versions, phases, allocations, audit and the configuration
revision, over one SQLAlchemy engine. A change, its audit row and the revision it publishes commit together.
Blocking: callers run it in a worker thread."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from chassis.errors import Aborted, AlreadyExists, NotFound, Unavailable
from experiment_service.tables import allocations, audit, config_state, experiment_versions, experiments, metadata
from experiment_service.tables import phases as phase_rows
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.api.experiments.v1 import experiment_service_pb2 as spb
from model_manager.registry import database_errors
from model_manager.tables import open_engine

_CONFIG_ROW = 1


def now_us() -> int:
    """Microseconds since the epoch."""
    return time.time_ns() // 1000


def timestamp(us: int) -> Timestamp:
    """Microseconds since the epoch as a Timestamp."""
    stamp = Timestamp()
    stamp.FromMicroseconds(us)
    return stamp


def status_name(status: int) -> str:
    """DRAFT, RUNNING, ... as stored and shown in messages."""
    return xpb.ExperimentStatus.Name(status).removeprefix("EXPERIMENT_STATUS_")  # type: ignore[arg-type]


@dataclass(frozen=True)
class Change:
    """One change of an experiment, committed only while its version is still `expected_version`."""

    experiment: xpb.Experiment  # the state after the change, version included; its phases are ignored
    expected_version: int
    action: str
    identity: str
    detail: str
    at_us: int
    end_phase: bool = False  # the current phase ends at `at_us`
    new_phase: tuple[float, ...] | None = None  # a phase starts with these weights (allocation 0)
    new_allocation: tuple[float, ...] | None = None  # a bandit re-weighting within the current phase
    publish: bool = False  # the assignment configuration changes: its revision grows


@dataclass(frozen=True)
class Committed:
    """An experiment as stored after a change, and the configuration revision the change published (0: none)."""

    experiment: xpb.Experiment
    revision: int
    allocation: int


class ExperimentStore:
    """Experiments over one SQLAlchemy engine (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def open(cls, url: str) -> ExperimentStore:
        """Connect to `url` and create the tables if missing; Unavailable while the database cannot be reached."""
        try:
            return cls(open_engine(url, metadata))
        except OperationalError as err:
            raise Unavailable(f"experiment database not reachable: {err.orig or err}") from err

    def close(self) -> None:
        """Close the engine's connections."""
        self.engine.dispose()

    @database_errors
    def create(self, experiment: xpb.Experiment, identity: str, at_us: int) -> xpb.Experiment:
        """Insert a new experiment (already valid, DRAFT at version 1); ALREADY_EXISTS when the key is taken."""
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    experiments.insert().values(
                        key=experiment.key,
                        status=status_name(experiment.status),
                        model_name=experiment.model_name,
                        version=experiment.version,
                        data=_blob(experiment),
                        created_us=at_us,
                        updated_us=at_us,
                    )
                )
                self._history(conn, experiment, at_us)
                self._audit(conn, experiment.key, experiment.version, "create", identity, at_us, "created in DRAFT")
        except IntegrityError as err:
            raise AlreadyExists(f"experiment.key: an experiment {experiment.key!r} exists already") from err
        return self._get(experiment.key)

    @database_errors
    def get(self, key: str) -> xpb.Experiment | None:
        """The experiment with its phases; None when there is none."""
        with self.engine.connect() as conn:
            return self._read(conn, key)

    def _get(self, key: str) -> xpb.Experiment:
        with self.engine.connect() as conn:
            found = self._read(conn, key)
        if found is None:
            raise NotFound(f"key: no experiment {key!r}")
        return found

    @database_errors
    def page(
        self, statuses: Sequence[int], model_name: str, limit: int, after: str = ""
    ) -> tuple[list[xpb.Experiment], bool]:
        """Experiments by key after `after`, at most `limit`, and whether more follow."""
        query = sa.select(experiments.c.key).where(experiments.c.key > after).order_by(experiments.c.key)
        if statuses:
            query = query.where(experiments.c.status.in_([status_name(s) for s in statuses]))
        if model_name:
            query = query.where(experiments.c.model_name == model_name)
        with self.engine.connect() as conn:
            keys = [row.key for row in conn.execute(query.limit(limit + 1))]
            found = [self._read(conn, key) for key in keys[:limit]]
        return [e for e in found if e is not None], len(keys) > limit

    @database_errors
    def commit(self, change: Change) -> Committed:
        """Apply `change` if the experiment is still at its expected version (ABORTED otherwise), with its phase,
        allocation, audit row and, when it publishes, the next configuration revision, in one transaction."""
        e, at = change.experiment, change.at_us
        with self.engine.begin() as conn:
            updated = conn.execute(
                experiments.update()
                .where(experiments.c.key == e.key, experiments.c.version == change.expected_version)
                .values(
                    status=status_name(e.status),
                    model_name=e.model_name,
                    version=e.version,
                    data=_blob(e),
                    updated_us=at,
                )
            )
            if updated.rowcount != 1:
                current = conn.execute(sa.select(experiments.c.version).where(experiments.c.key == e.key)).scalar()
                if current is None:
                    raise NotFound(f"key: no experiment {e.key!r}")
                raise Aborted(
                    f"expected_version: the experiment is at version {current}, not {change.expected_version}; "
                    "read it again and retry"
                )
            current_phase = self._current_phase(conn, e.key)
            if change.end_phase and current_phase:
                conn.execute(
                    phase_rows.update()
                    .where(phase_rows.c.key == e.key, phase_rows.c.number == current_phase)
                    .values(ended_us=at)
                )
            if change.new_phase is not None:
                current_phase += 1
                conn.execute(
                    phase_rows.insert().values(
                        key=e.key,
                        number=current_phase,
                        started_us=at,
                        ended_us=0,
                        weights=list(change.new_phase),
                        experiment_version=e.version,
                    )
                )
                self._allocate(conn, e, current_phase, 0, change.new_phase, at)
            allocation = self._allocation(conn, e.key, current_phase)
            if change.new_allocation is not None:
                allocation += 1
                self._allocate(conn, e, current_phase, allocation, change.new_allocation, at)
            self._history(conn, e, at)
            self._audit(conn, e.key, e.version, change.action, change.identity, at, change.detail)
            revision = self._next_revision(conn) if change.publish else 0
            stored = self._read(conn, e.key)
        assert stored is not None
        return Committed(stored, revision, allocation)

    @database_errors
    def audit(self, key: str) -> list[spb.AuditEntry]:
        """The experiment's changes, oldest first; NOT_FOUND for an unknown key."""
        with self.engine.connect() as conn:
            if conn.execute(sa.select(experiments.c.key).where(experiments.c.key == key)).first() is None:
                raise NotFound(f"key: no experiment {key!r}")
            rows = conn.execute(audit.select().where(audit.c.key == key).order_by(audit.c.id))
            return [
                spb.AuditEntry(
                    version=r.version, action=r.action, identity=r.identity, at=timestamp(r.at_us), detail=r.detail
                )
                for r in rows
            ]

    @database_errors
    def allocations(self, key: str, phase: int) -> dict[int, tuple[float, ...]]:
        """The weights in force per allocation of the phase; empty for an unknown experiment or phase."""
        query = allocations.select().where(allocations.c.key == key, allocations.c.phase == phase)
        with self.engine.connect() as conn:
            return {r.allocation: tuple(float(w) for w in r.weights) for r in conn.execute(query)}

    @database_errors
    def revision(self) -> int:
        """The configuration revision last published."""
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(config_state.c.revision)).scalar() or 0)

    @database_errors
    def advance_revision(self, at_least: int) -> None:
        """Raise the configuration revision to `at_least` unless it is there already."""
        with self.engine.begin() as conn:
            current = conn.execute(sa.select(config_state.c.revision)).scalar()
            if current is None:
                conn.execute(config_state.insert().values(id=_CONFIG_ROW, revision=at_least))
            elif current < at_least:
                conn.execute(config_state.update().where(config_state.c.id == _CONFIG_ROW).values(revision=at_least))

    @database_errors
    def running(self) -> tuple[int, list[tuple[xpb.Experiment, int]]]:
        """The configuration revision and every running experiment with its current allocation."""
        with self.engine.connect() as conn:
            revision = conn.execute(sa.select(config_state.c.revision)).scalar() or 0
            keys = conn.scalars(
                sa.select(experiments.c.key).where(experiments.c.status == "RUNNING").order_by(experiments.c.key)
            ).all()
            out = []
            for key in keys:
                e = self._read(conn, key)
                if e is not None:
                    out.append((e, self._allocation(conn, key, e.phases[-1].number if e.phases else 0)))
        return int(revision), out

    # --- inside transactions ------------------------------------------------------------------------------

    def _read(self, conn: Connection, key: str) -> xpb.Experiment | None:
        row = conn.execute(sa.select(experiments.c.data).where(experiments.c.key == key)).first()
        if row is None:
            return None
        e = xpb.Experiment.FromString(row.data)
        for p in conn.execute(phase_rows.select().where(phase_rows.c.key == key).order_by(phase_rows.c.number)):
            phase = e.phases.add(number=p.number, weights=p.weights, experiment_version=p.experiment_version)
            phase.started_at.FromMicroseconds(p.started_us)
            if p.ended_us:
                phase.ended_at.FromMicroseconds(p.ended_us)
        return e

    def _current_phase(self, conn: Connection, key: str) -> int:
        return int(
            conn.execute(sa.select(sa.func.max(phase_rows.c.number)).where(phase_rows.c.key == key)).scalar() or 0
        )

    def _allocation(self, conn: Connection, key: str, phase: int) -> int:
        query = sa.select(sa.func.max(allocations.c.allocation)).where(
            allocations.c.key == key, allocations.c.phase == phase
        )
        return int(conn.execute(query).scalar() or 0)

    def _allocate(
        self, conn: Connection, e: xpb.Experiment, phase: int, allocation: int, weights: Sequence[float], at: int
    ) -> None:
        conn.execute(
            allocations.insert().values(
                key=e.key,
                phase=phase,
                allocation=allocation,
                weights=list(weights),
                experiment_version=e.version,
                at_us=at,
            )
        )

    def _history(self, conn: Connection, e: xpb.Experiment, at: int) -> None:
        conn.execute(experiment_versions.insert().values(key=e.key, version=e.version, data=_blob(e), at_us=at))

    def _audit(
        self, conn: Connection, key: str, version: int, action: str, identity: str, at: int, detail: str
    ) -> None:
        conn.execute(
            audit.insert().values(
                key=key, version=version, action=action, identity=identity[:256], at_us=at, detail=detail[:4096]
            )
        )

    def _next_revision(self, conn: Connection) -> int:
        bumped = conn.execute(
            config_state.update().where(config_state.c.id == _CONFIG_ROW).values(revision=config_state.c.revision + 1)
        )
        if bumped.rowcount == 0:
            conn.execute(config_state.insert().values(id=_CONFIG_ROW, revision=1))
            return 1
        return int(conn.execute(sa.select(config_state.c.revision)).scalar_one())


def _blob(e: xpb.Experiment) -> bytes:
    copy = xpb.Experiment()
    copy.CopyFrom(e)
    copy.ClearField("phases")
    return copy.SerializeToString(deterministic=True)
