"""Between the registry's records and the fresco.models.v1 messages: one place for each conversion."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from chassis.errors import InvalidArgument
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager import test_reports
from model_manager.lifecycle import Stage
from model_manager.records import AuditEntry, Lineage, ModelRecord, ModelSpec, VersionRecord, VersionSpec

_PREFIX_FORMAT = "MODEL_FORMAT_"
_PREFIX_STAGE = "MODEL_STAGE_"


def format_name(value: int) -> str:
    """A ModelFormat number as the registry's format name ("" for unset or unknown)."""
    if not value or value not in rpb.ModelFormat.values():
        return ""
    return rpb.ModelFormat.Name(value).removeprefix(_PREFIX_FORMAT).lower()  # type: ignore[arg-type]


def format_value(name: str) -> rpb.ModelFormat.ValueType:
    """The registry's format name as its ModelFormat number."""
    return rpb.ModelFormat.Value(_PREFIX_FORMAT + name.upper())


def stage_of(field: str, value: int) -> Stage:
    """A ModelStage number as a stage; INVALID_ARGUMENT for unset or unknown numbers."""
    if value == rpb.MODEL_STAGE_UNSPECIFIED or value not in rpb.ModelStage.values():
        choices = ", ".join(n for n in rpb.ModelStage.keys() if n != "MODEL_STAGE_UNSPECIFIED")  # noqa: SIM118
        raise InvalidArgument(f"{field}: expected one of {choices}, got {value}")
    return Stage(rpb.ModelStage.Name(value).removeprefix(_PREFIX_STAGE).lower())  # type: ignore[arg-type]


def stage_value(stage: Stage) -> rpb.ModelStage.ValueType:
    """A stage as its ModelStage number."""
    return rpb.ModelStage.Value(_PREFIX_STAGE + stage.value.upper())


def timestamp(us: int) -> Timestamp:
    """Microseconds since the epoch as a Timestamp."""
    stamp = Timestamp()
    stamp.FromMicroseconds(us)
    return stamp


def model_spec(model: rpb.Model) -> ModelSpec:
    """A CreateModel request's model as a spec (server-set fields ignored)."""
    return ModelSpec(
        name=model.name,
        owner=model.owner,
        description=model.description,
        labels=dict(model.labels),
        signature=model.signature,
        fallback_version=model.fallback_version,
        static_fallback=model.static_fallback,
    )


def version_spec(meta: pb.UploadModelVersionMetadata) -> VersionSpec:
    """Upload metadata as a spec; the format is named or refused here, the rest is checked by the schema."""
    if meta.format not in rpb.ModelFormat.values():
        raise InvalidArgument(f"metadata.format: expected a ModelFormat, got {meta.format}")
    return VersionSpec(
        model_name=meta.model_name,
        format=format_name(meta.format),
        expected_sha256=meta.expected_sha256,
        expected_size_bytes=meta.expected_size_bytes,
        version=meta.version,
        framework=meta.framework,
        description=meta.description,
        source_run=meta.source_run,
        labels=dict(meta.labels),
        lineage=Lineage(
            code_commit=meta.lineage.code_commit,
            dataset_uri=meta.lineage.training_dataset_uri,
            dataset_sha256=meta.lineage.training_dataset_sha256,
            parent_version=meta.lineage.parent_version,
        ),
        signature=meta.signature,
        training_statistics=tuple(meta.training_statistics),
        report=meta.report,
        backend_hints=meta.backend_hints,
        drift_policy=meta.drift_policy if meta.HasField("drift_policy") else None,
        test_summary=test_reports.summarize(meta.test_report) if meta.HasField("test_report") else None,
    )


def model_message(record: ModelRecord) -> rpb.Model:
    """A model record as the API shows it."""
    return rpb.Model(
        name=record.name,
        description=record.description,
        owner=record.owner,
        labels=dict(record.labels),
        production_version=record.production_version,
        latest_version=record.latest_version,
        created_at=timestamp(record.created_us),
        updated_at=timestamp(record.updated_us),
        signature=record.signature,
        aliases=dict(record.aliases),
        fallback_version=record.fallback_version,
        static_fallback=record.static_fallback if record.static_fallback.outputs else None,  # unset: none
    )


def version_message(record: VersionRecord) -> rpb.ModelVersion:
    """A version record as the API shows it."""
    return rpb.ModelVersion(
        model_name=record.model_name,
        version=record.version,
        stage=stage_value(record.stage),
        format=format_value(record.format),
        framework=record.framework,
        signature=record.signature,
        training_statistics=record.training_statistics,
        report=record.report,
        sha256=record.sha256,
        size_bytes=record.size_bytes,
        artifact_uri=record.artifact_uri,
        description=record.description,
        source_run=record.source_run,
        labels=dict(record.labels),
        created_at=timestamp(record.created_us),
        stage_updated_at=timestamp(record.stage_updated_us),
        lineage=rpb.Lineage(
            code_commit=record.lineage.code_commit,
            training_dataset_uri=record.lineage.dataset_uri,
            training_dataset_sha256=record.lineage.dataset_sha256,
            parent_version=record.lineage.parent_version,
        ),
        backend_hints=record.backend_hints,
        aliases=record.aliases,
        created_by=record.created_by,
        gate_results=record.gate_results,
        drift_policy=record.drift_policy,
        test_summary=record.test_summary,
    )


def audit_message(entry: AuditEntry) -> rpb.AuditRecord:
    """An audit entry as the API shows it."""
    return rpb.AuditRecord(
        id=entry.id,
        at=timestamp(entry.at_us),
        identity=entry.identity,
        action=entry.action,
        model_name=entry.model_name,
        version=entry.version,
        reason=entry.reason,
        details=dict(entry.details),
    )
