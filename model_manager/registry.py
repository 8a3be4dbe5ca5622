"""The registry: models, immutable versions with lineage, aliases, the gate stage of each version and the audit log.

Every write takes the caller's authenticated identity as an argument and records it in the audit log in the same
transaction as the change. Blocking (SQLAlchemy): the servicer calls it from a worker thread.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import DataError, IntegrityError, InterfaceError, OperationalError

from chassis.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from fresco.api.features.v1 import statistics_pb2 as spb
from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager import pages, schema
from model_manager.lifecycle import Stage, check_transition
from model_manager.model_serving import UPDATABLE, ModelUpdate, check_static_fallback
from model_manager.records import (
    AuditEntry,
    Lineage,
    ModelRecord,
    ModelSpec,
    Page,
    StoredArtifact,
    VersionRecord,
    VersionSpec,
)
from model_manager.tables import (
    aliases,
    audit,
    gate_results,
    model_serving,
    models,
    open_engine,
    version_evidence,
    versions,
)

DEFAULT_PAGE_SIZE = 100
P = ParamSpec("P")
R = TypeVar("R")
# Concurrent registrations that take "the next version" retry on a lost race; a few rounds settle any real contention.
NEXT_VERSION_ATTEMPTS = 8


def now_us() -> int:
    """Microseconds since the epoch."""
    return time.time_ns() // 1000


def database_errors(method: Callable[P, R]) -> Callable[P, R]:
    """A database that is down, restarting or locked is UNAVAILABLE (retry later), not an internal error."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except (OperationalError, InterfaceError) as err:
            raise Unavailable(f"registry database unavailable: {str(err.orig or err).strip()[:300]}") from err
        except DataError as err:  # a value the checks let through and the database refuses is still the caller's
            raise InvalidArgument(f"a value is not storable: {str(err.orig or err).strip()[:300]}") from err

    return wrapper


class Registry:
    """Models, versions, aliases, stages and audit over one SQLAlchemy engine (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine, clock: Callable[[], int] = now_us) -> None:
        self.engine = engine
        self._clock = clock

    @classmethod
    def open(cls, url: str) -> Registry:
        """Connect to `url` and create the tables if missing; Unavailable while the database cannot be reached."""
        try:
            return cls(open_engine(url))
        except OperationalError as err:
            raise Unavailable(f"registry database not reachable: {err.orig or err}") from err

    def close(self) -> None:
        """Close the engine's connections."""
        self.engine.dispose()

    # --- models -------------------------------------------------------------------------------------------

    @database_errors
    def create_model(self, spec: ModelSpec, identity: str, reason: str = "") -> ModelRecord:
        """Create a model with no versions; ALREADY_EXISTS if the name is taken."""
        schema.model_spec(spec)
        if spec.fallback_version:
            raise InvalidArgument("model.fallback_version: expected 0 for a new model (it has no versions yet)")
        check_static_fallback("model.static_fallback", spec.static_fallback, spec.signature)
        at = self._clock()
        try:
            with self.engine.begin() as conn:
                created = conn.execute(
                    models.insert().values(
                        name=spec.name,
                        owner=spec.owner,
                        description=spec.description,
                        labels=dict(spec.labels),
                        signature=spec.signature.SerializeToString(deterministic=True),
                        latest_version=0,
                        production_version=0,
                        created_by=identity,
                        created_us=at,
                        updated_us=at,
                    )
                )
                if spec.static_fallback.outputs:
                    key = created.inserted_primary_key
                    assert key is not None
                    self._put_serving(conn, key[0], 0, spec.static_fallback)
                self._audit(conn, identity, "model.create", spec.name, 0, reason, {"owner": spec.owner})
        except IntegrityError as err:
            raise AlreadyExists(f"model.name: a model named {spec.name!r} exists already") from err
        return self.get_model(spec.name)

    @database_errors
    def update_model(self, name: str, update: ModelUpdate, identity: str, reason: str = "") -> ModelRecord:
        """Change the model fields named in `update.paths`; audited with the old and new values."""
        schema.model_name("model.name", name)
        unknown = sorted(update.paths - set(UPDATABLE))
        if unknown or not update.paths:
            got = unknown[0] if unknown else "nothing"
            raise InvalidArgument(f"update_mask: expected some of {', '.join(UPDATABLE)}, got {got}")
        with self.engine.begin() as conn:
            row = self._model_row(conn, name, "model.name")
            before = self._model(conn, row)
            changes: dict[str, object] = {}
            if "description" in update.paths:
                schema.text("model.description", update.description, schema.MAX_TEXT)
                changes["description"] = update.description
            if "owner" in update.paths:
                schema.text("model.owner", update.owner)
                changes["owner"] = update.owner
            if "labels" in update.paths:
                schema.labels("model.labels", update.labels)
                changes["labels"] = dict(update.labels)
            fallback, static = before.fallback_version, before.static_fallback
            if "fallback_version" in update.paths:
                fallback = update.fallback_version
                if fallback:
                    schema.version_number("model.fallback_version", fallback)
                    target = self._version_row(conn, row, fallback, field="model.fallback_version")
                    if target.stage == Stage.REJECTED.value:
                        raise FailedPrecondition(
                            f"model.fallback_version: version {fallback} of {name} was rejected by its gates"
                        )
            if "static_fallback" in update.paths:
                check_static_fallback("model.static_fallback", update.static_fallback, before.signature)
                static = update.static_fallback
            conn.execute(models.update().where(models.c.id == row.id).values(updated_us=self._clock(), **changes))
            self._put_serving(conn, row.id, fallback, static)
            details = {p: " ".join(str(getattr(update, p)).split()) or "none" for p in sorted(update.paths)}
            self._audit(conn, identity, "model.update", name, 0, reason, details)
            return self._model(conn, self._model_row(conn, name))

    def _put_serving(self, conn: Connection, model_id: int, fallback: int, static: rpb.StaticFallback) -> None:
        conn.execute(model_serving.delete().where(model_serving.c.model_id == model_id))
        if fallback or static.outputs:
            blob = static.SerializeToString(deterministic=True)
            conn.execute(
                model_serving.insert().values(model_id=model_id, fallback_version=fallback, static_fallback=blob)
            )

    @database_errors
    def get_model(self, name: str) -> ModelRecord:
        """One model with its aliases; NOT_FOUND if there is none of that name."""
        schema.model_name("name", name)
        with self.engine.connect() as conn:
            return self._model(conn, self._model_row(conn, name))

    @database_errors
    def list_models(
        self, page_size: int = 0, page_token: str = "", owner: str = "", labels: Mapping[str, str] | None = None
    ) -> Page[ModelRecord]:
        """Models by name, filtered by owner and labels, a page at a time."""
        size = schema.page_size("page_size", page_size, DEFAULT_PAGE_SIZE)
        schema.text("owner", owner)
        after = pages.last_key("page_token", "m", page_token) if page_token else ""
        wanted = dict(labels or {})
        found: list[ModelRecord] = []
        with self.engine.connect() as conn:
            # Labels are filtered here, not in SQL (JSON differs between the two databases): read on until full.
            while len(found) <= size:
                query = models.select().where(models.c.name > after).order_by(models.c.name).limit(size + 1)
                if owner:
                    query = query.where(models.c.owner == owner)
                rows = conn.execute(query).all()
                for row in rows:
                    after = row.name
                    if all(row.labels.get(k) == v for k, v in wanted.items()):
                        found.append(self._model(conn, row))
                        if len(found) > size:
                            break
                if len(rows) <= size:
                    break
        if len(found) > size:
            return Page(found[:size], pages.token("m", found[size - 1].name))
        return Page(found)

    # --- versions -----------------------------------------------------------------------------------------

    @database_errors
    def check_can_register(self, spec: VersionSpec) -> None:
        """Refuse, before any byte is uploaded, a version whose model, number or parent rules it out."""
        with self.engine.connect() as conn:
            model = self._model_row(conn, spec.model_name, "metadata.model_name")
            self._check_numbers(conn, model, spec)

    def _check_numbers(self, conn: Connection, model: Row[Any], spec: VersionSpec) -> None:
        if spec.version and self._version_row(conn, model, spec.version, missing_ok=True) is not None:
            raise AlreadyExists(f"metadata.version: version {spec.version} of {spec.model_name} exists already")
        parent = spec.lineage.parent_version
        if parent and self._version_row(conn, model, parent, missing_ok=True) is None:
            raise InvalidArgument(
                f"metadata.lineage.parent_version: {spec.model_name} has no version {parent} to derive from"
            )

    @database_errors
    def register_version(
        self, spec: VersionSpec, artifact: StoredArtifact, identity: str, reason: str = ""
    ) -> VersionRecord:
        """Record a version whose artifact is stored: the number asked for, or the next one; stage registered."""
        spec = schema.version_spec(spec)
        if artifact.sha256 != spec.expected_sha256:
            raise InvalidArgument(
                f"metadata.expected_sha256: expected {spec.expected_sha256}, the artifact's is {artifact.sha256}"
            )
        for _ in range(NEXT_VERSION_ATTEMPTS):
            try:
                with self.engine.begin() as conn:
                    return self._insert_version(conn, spec, artifact, identity, reason)
            except IntegrityError as err:
                if spec.version:
                    raise AlreadyExists(
                        f"metadata.version: version {spec.version} of {spec.model_name} exists already"
                    ) from err
            except _LostRace:
                continue
        raise Unavailable(f"metadata.model_name: too many concurrent registrations of {spec.model_name}; retry")

    def _insert_version(
        self, conn: Connection, spec: VersionSpec, artifact: StoredArtifact, identity: str, reason: str
    ) -> VersionRecord:
        model = self._model_row(conn, spec.model_name, "metadata.model_name")
        self._check_numbers(conn, model, spec)
        number = spec.version or model.latest_version + 1
        if number > schema.MAX_VERSION:
            raise FailedPrecondition(f"metadata.version: {spec.model_name} has used every version number")
        at = self._clock()
        statistics = spb.FeatureViewStatistics(features=spec.training_statistics)
        try:
            conn.execute(
                versions.insert().values(
                    model_id=model.id,
                    version=number,
                    stage=Stage.REGISTERED.value,
                    format=spec.format,
                    framework=spec.framework,
                    sha256=artifact.sha256,
                    size_bytes=artifact.size_bytes,
                    artifact_uri=artifact.uri,
                    description=spec.description,
                    labels=dict(spec.labels),
                    code_commit=spec.lineage.code_commit,
                    dataset_uri=spec.lineage.dataset_uri,
                    dataset_sha256=spec.lineage.dataset_sha256,
                    parent_version=spec.lineage.parent_version,
                    source_run=spec.source_run,
                    expected_memory_bytes=spec.backend_hints.expected_memory_bytes,
                    signature=spec.signature.SerializeToString(deterministic=True),
                    training_statistics=statistics.SerializeToString(deterministic=True),
                    report=spec.report.SerializeToString(deterministic=True),
                    backend_hints=spec.backend_hints.SerializeToString(deterministic=True),
                    created_by=identity,
                    created_us=at,
                    stage_updated_us=at,
                )
            )
        except IntegrityError:
            if spec.version:
                raise
            raise _LostRace() from None
        if spec.drift_policy is not None or spec.test_summary is not None:
            evidence = rpb.ModelVersion(drift_policy=spec.drift_policy, test_summary=spec.test_summary)
            row_id = conn.execute(
                sa.select(versions.c.id).where(versions.c.model_id == model.id, versions.c.version == number)
            ).scalar_one()
            conn.execute(
                version_evidence.insert().values(version_id=row_id, data=evidence.SerializeToString(deterministic=True))
            )
        # Optimistic: the model row moves only from the latest number this transaction read.
        moved = conn.execute(
            models.update()
            .where(models.c.id == model.id, models.c.latest_version == model.latest_version)
            .values(latest_version=max(number, model.latest_version), updated_us=at)
        ).rowcount
        if moved != 1:
            raise _LostRace()
        details = {"sha256": artifact.sha256, "size_bytes": str(artifact.size_bytes), "format": spec.format}
        self._audit(conn, identity, "version.register", spec.model_name, number, reason, details)
        return self._version(conn, model, self._version_row(conn, model, number))

    @database_errors
    def get_version(
        self, model_name: str, version: int = 0, stage: Stage | None = None, alias: str = ""
    ) -> VersionRecord:
        """A version by number, by alias, or the latest in a stage, or the latest of all; NOT_FOUND if none."""
        schema.model_name("model_name", model_name)
        with self.engine.connect() as conn:
            model = self._model_row(conn, model_name, "model_name")
            if alias:
                schema.alias("alias", alias)
                target = conn.execute(
                    sa.select(aliases.c.version).where(aliases.c.model_id == model.id, aliases.c.alias == alias)
                ).scalar()
                if target is None:
                    raise NotFound(f"alias: {model_name} has no alias {alias!r}")
                return self._version(conn, model, self._version_row(conn, model, target))
            if version:
                schema.version_number("version", version)
                return self._version(conn, model, self._version_row(conn, model, version))
            query = versions.select().where(versions.c.model_id == model.id)
            if stage is not None:
                query = query.where(versions.c.stage == stage.value)
            row = conn.execute(query.order_by(versions.c.version.desc()).limit(1)).first()
            if row is None:
                where = f" in stage {stage.value}" if stage is not None else ""
                raise NotFound(f"model_name: {model_name} has no version{where}")
            return self._version(conn, model, row)

    @database_errors
    def list_versions(
        self, model_name: str, stages: Sequence[Stage] = (), page_size: int = 0, page_token: str = ""
    ) -> Page[VersionRecord]:
        """Versions of a model, newest first, optionally only those in some stages."""
        schema.model_name("model_name", model_name)
        size = schema.page_size("page_size", page_size, DEFAULT_PAGE_SIZE)
        before = pages.last_number("page_token", "v", page_token) if page_token else None
        with self.engine.connect() as conn:
            model = self._model_row(conn, model_name, "model_name")
            query = versions.select().where(versions.c.model_id == model.id)
            if before is not None:
                query = query.where(versions.c.version < before)
            if stages:
                query = query.where(versions.c.stage.in_([s.value for s in stages]))
            rows = conn.execute(query.order_by(versions.c.version.desc()).limit(size + 1)).all()
            items = [self._version(conn, model, row) for row in rows[:size]]
        token = pages.token("v", str(items[-1].version)) if len(rows) > size else ""
        return Page(items, token)

    @database_errors
    def references(self, sha256: str) -> int:
        """How many versions (of any model) use the artifact with this digest."""
        with self.engine.connect() as conn:
            query = sa.select(sa.func.count()).select_from(versions).where(versions.c.sha256 == sha256)
            return int(conn.execute(query).scalar_one())

    # --- stages -------------------------------------------------------------------------------------------

    @database_errors
    def set_stage(
        self,
        model_name: str,
        version: int,
        target: Stage,
        identity: str,
        reason: str = "",
        details: Mapping[str, str] | None = None,
        gates: Sequence[rpb.GateResult] | None = None,
    ) -> VersionRecord:
        """Move a version along the gate state machine; entering production archives the previous production one.
        `details` join the audit record; `gates`, when given, become the version's gate results, in one transaction."""
        schema.model_name("model_name", model_name)
        schema.version_number("version", version)
        with self.engine.begin() as conn:
            model = self._model_row(conn, model_name, "model_name")
            row = self._version_row(conn, model, version)
            source = Stage(row.stage)
            check_transition(f"version {version} of {model_name}", source, target)
            at = self._clock()
            self._move(conn, row.id, source, target, at)
            if gates is not None:
                results = rpb.ModelVersion(gate_results=gates).SerializeToString(deterministic=True)
                conn.execute(gate_results.delete().where(gate_results.c.version_id == row.id))
                conn.execute(gate_results.insert().values(version_id=row.id, results=results, updated_us=at))
            moved = {**(details or {}), "from": source.value, "to": target.value}
            self._audit(conn, identity, "version.stage", model_name, version, reason, moved)
            production = model.production_version
            if target is Stage.PRODUCTION:
                if production and production != version:
                    # One production version per model: the one it replaces is archived, in the same transaction.
                    old = self._version_row(conn, model, production)
                    self._move(conn, old.id, Stage.PRODUCTION, Stage.ARCHIVED, at)
                    details = {"from": "production", "to": "archived", "superseded_by": str(version)}
                    self._audit(conn, identity, "version.stage", model_name, production, reason, details)
                production = version
            elif source is Stage.PRODUCTION:
                production = 0
            if production != model.production_version:
                conn.execute(
                    models.update().where(models.c.id == model.id).values(production_version=production, updated_us=at)
                )
            return self._version(conn, model, self._version_row(conn, model, version))

    def _move(self, conn: Connection, row_id: int, source: Stage, target: Stage, at: int) -> None:
        # Optimistic: a concurrent move of the same version makes this one match no row, and it is refused.
        moved = conn.execute(
            versions.update()
            .where(versions.c.id == row_id, versions.c.stage == source.value)
            .values(stage=target.value, stage_updated_us=at)
        ).rowcount
        if moved != 1:
            raise FailedPrecondition(f"stage: the version left {source.value} concurrently; read it again and retry")

    # --- aliases ------------------------------------------------------------------------------------------

    @database_errors
    def set_alias(
        self, model_name: str, alias: str, version: int, identity: str, reason: str = ""
    ) -> tuple[ModelRecord, int]:
        """Point an alias at a version; returns the model and the version it pointed at before (0 if new)."""
        schema.model_name("model_name", model_name)
        schema.alias("alias", alias)
        schema.version_number("version", version)
        for attempt in range(2):
            try:
                with self.engine.begin() as conn:
                    model = self._model_row(conn, model_name, "model_name")
                    target = self._version_row(conn, model, version, field="version")
                    if target.stage == Stage.REJECTED.value:
                        raise FailedPrecondition(
                            f"version: version {version} of {model_name} was rejected by its gates; "
                            "an alias cannot point at it"
                        )
                    key = (aliases.c.model_id == model.id) & (aliases.c.alias == alias)
                    previous = conn.execute(sa.select(aliases.c.version).where(key)).scalar()
                    at = self._clock()
                    if previous is None:
                        conn.execute(
                            aliases.insert().values(model_id=model.id, alias=alias, version=version, updated_us=at)
                        )
                    else:
                        conn.execute(aliases.update().where(key).values(version=version, updated_us=at))
                    details = {"alias": alias, "from": str(previous or 0), "to": str(version)}
                    self._audit(conn, identity, "alias.set", model_name, version, reason, details)
                    return self._model(conn, self._model_row(conn, model_name)), int(previous or 0)
            except IntegrityError:
                if attempt:  # a concurrent first setting of the same alias won; the second round updates it
                    raise
        raise AssertionError("unreachable")

    @database_errors
    def delete_alias(self, model_name: str, alias: str, identity: str, reason: str = "") -> tuple[ModelRecord, int]:
        """Remove an alias; returns the model and the version it pointed at."""
        schema.model_name("model_name", model_name)
        schema.alias("alias", alias)
        with self.engine.begin() as conn:
            model = self._model_row(conn, model_name, "model_name")
            key = (aliases.c.model_id == model.id) & (aliases.c.alias == alias)
            previous = conn.execute(sa.select(aliases.c.version).where(key)).scalar()
            if previous is None:
                raise NotFound(f"alias: {model_name} has no alias {alias!r}")
            conn.execute(aliases.delete().where(key))
            self._audit(conn, identity, "alias.delete", model_name, previous, reason, {"alias": alias})
            return self._model(conn, self._model_row(conn, model_name)), int(previous)

    # --- audit --------------------------------------------------------------------------------------------

    @database_errors
    def list_audit(self, model_name: str = "", page_size: int = 0, page_token: str = "") -> Page[AuditEntry]:
        """Audit entries, newest first, optionally about one model only."""
        if model_name:
            schema.model_name("model_name", model_name)
        size = schema.page_size("page_size", page_size, DEFAULT_PAGE_SIZE)
        before = pages.last_number("page_token", "a", page_token) if page_token else None
        query = audit.select()
        if model_name:
            query = query.where(audit.c.model_name == model_name)
        if before is not None:
            query = query.where(audit.c.id < before)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(audit.c.id.desc()).limit(size + 1)).all()
        items = [
            AuditEntry(
                id=row.id,
                at_us=row.at_us,
                identity=row.identity,
                action=row.action,
                model_name=row.model_name,
                version=row.version,
                reason=row.reason,
                details=dict(row.details),
            )
            for row in rows[:size]
        ]
        return Page(items, pages.token("a", str(items[-1].id)) if len(rows) > size else "")

    def _audit(
        self,
        conn: Connection,
        identity: str,
        action: str,
        model_name: str,
        version: int,
        reason: str,
        details: Mapping[str, str],
    ) -> None:
        schema.text("reason", reason, schema.MAX_TEXT)  # raised inside the transaction: the change rolls back
        conn.execute(
            audit.insert().values(
                at_us=self._clock(),
                identity=identity,
                action=action,
                model_name=model_name,
                version=version,
                reason=reason,
                details=dict(details),
            )
        )

    # --- rows to records ----------------------------------------------------------------------------------

    def _model_row(self, conn: Connection, name: str, field: str = "name") -> Row[Any]:
        row = conn.execute(models.select().where(models.c.name == name)).first()
        if row is None:
            raise NotFound(f"{field}: no model named {name!r}")
        return row

    def _version_row(
        self, conn: Connection, model: Row[Any], version: int, *, missing_ok: bool = False, field: str = "version"
    ) -> Row[Any]:
        row = conn.execute(
            versions.select().where(versions.c.model_id == model.id, versions.c.version == version)
        ).first()
        if row is None and not missing_ok:
            raise NotFound(f"{field}: {model.name} has no version {version}")
        return row  # type: ignore[return-value]  # None only when the caller asked for it

    def _model(self, conn: Connection, row: Row[Any]) -> ModelRecord:
        pointed = conn.execute(
            sa.select(aliases.c.alias, aliases.c.version).where(aliases.c.model_id == row.id).order_by(aliases.c.alias)
        ).all()
        serving = conn.execute(model_serving.select().where(model_serving.c.model_id == row.id)).first()
        return ModelRecord(
            name=row.name,
            owner=row.owner,
            description=row.description,
            labels=dict(row.labels),
            signature=rpb.ModelSignature.FromString(row.signature),
            latest_version=row.latest_version,
            production_version=row.production_version,
            aliases={a.alias: a.version for a in pointed},
            created_by=row.created_by,
            created_us=row.created_us,
            updated_us=row.updated_us,
            fallback_version=serving.fallback_version if serving else 0,
            static_fallback=rpb.StaticFallback.FromString(serving.static_fallback) if serving else rpb.StaticFallback(),
        )

    def _version(self, conn: Connection, model: Row[Any], row: Row[Any]) -> VersionRecord:
        gates = conn.execute(sa.select(gate_results.c.results).where(gate_results.c.version_id == row.id)).scalar()
        blob = conn.execute(sa.select(version_evidence.c.data).where(version_evidence.c.version_id == row.id)).scalar()
        evidence = rpb.ModelVersion.FromString(blob) if blob is not None else rpb.ModelVersion()
        pointing = conn.execute(
            sa.select(aliases.c.alias)
            .where(aliases.c.model_id == model.id, aliases.c.version == row.version)
            .order_by(aliases.c.alias)
        ).scalars()
        return VersionRecord(
            model_name=model.name,
            version=row.version,
            stage=Stage(row.stage),
            format=row.format,
            framework=row.framework,
            sha256=row.sha256,
            size_bytes=row.size_bytes,
            artifact_uri=row.artifact_uri,
            description=row.description,
            source_run=row.source_run,
            labels=dict(row.labels),
            lineage=Lineage(row.code_commit, row.dataset_uri, row.dataset_sha256, row.parent_version),
            signature=rpb.ModelSignature.FromString(row.signature),
            training_statistics=tuple(spb.FeatureViewStatistics.FromString(row.training_statistics).features),
            report=rpb.TrainingReport.FromString(row.report),
            backend_hints=rpb.BackendHints.FromString(row.backend_hints),
            aliases=tuple(pointing),
            created_by=row.created_by,
            created_us=row.created_us,
            stage_updated_us=row.stage_updated_us,
            gate_results=tuple(rpb.ModelVersion.FromString(gates).gate_results) if gates is not None else (),
            drift_policy=evidence.drift_policy if evidence.HasField("drift_policy") else None,
            test_summary=evidence.test_summary if evidence.HasField("test_summary") else None,
        )


class _LostRace(Exception):
    """Another registration took the number this one read as next: roll back and read again."""
