"""What the registry stores and answers: models, versions, aliases' targets and audit entries, as plain values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from fresco.api.features.v1 import statistics_pb2 as spb
from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager.lifecycle import Stage

T = TypeVar("T")

# Protobuf messages serve as the plain values of the nested metadata (signature, statistics, report, hints):
# they are data, not gRPC, and they are what the registry persists, so there is one definition of each.


@dataclass(frozen=True)
class Lineage:
    """Where a version comes from: code commit, training data set (uri and sha256) and parent version."""

    code_commit: str = ""
    dataset_uri: str = ""
    dataset_sha256: str = ""
    parent_version: int = 0


@dataclass(frozen=True)
class ModelSpec:
    """A model to create."""

    name: str
    owner: str = ""
    description: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    signature: rpb.ModelSignature = field(default_factory=rpb.ModelSignature)
    fallback_version: int = 0  # served when the chosen version fails; 0 for none
    static_fallback: rpb.StaticFallback = field(default_factory=rpb.StaticFallback)  # answered when none can serve


@dataclass(frozen=True)
class VersionSpec:
    """A version to register, as declared before its artifact arrives."""

    model_name: str
    format: str
    expected_sha256: str
    expected_size_bytes: int = 0
    version: int = 0
    framework: str = ""
    description: str = ""
    source_run: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    lineage: Lineage = field(default_factory=Lineage)
    signature: rpb.ModelSignature = field(default_factory=rpb.ModelSignature)
    training_statistics: tuple[spb.FeatureStatistics, ...] = ()
    report: rpb.TrainingReport = field(default_factory=rpb.TrainingReport)
    backend_hints: rpb.BackendHints = field(default_factory=rpb.BackendHints)
    drift_policy: rpb.DriftPolicy | None = None  # None: the defaults
    test_summary: rpb.TestSummary | None = None  # read from the test report; None without one


@dataclass(frozen=True)
class StoredArtifact:
    """An artifact in the content-addressed store; `created` when this upload put it there (no earlier copy)."""

    sha256: str
    size_bytes: int
    uri: str
    created: bool


@dataclass(frozen=True)
class ModelRecord:
    """A registered model with its aliases."""

    name: str
    owner: str
    description: str
    labels: Mapping[str, str]
    signature: rpb.ModelSignature
    latest_version: int
    production_version: int
    aliases: Mapping[str, int]
    created_by: str
    created_us: int
    updated_us: int
    fallback_version: int = 0
    static_fallback: rpb.StaticFallback = field(default_factory=rpb.StaticFallback)


@dataclass(frozen=True)
class VersionRecord:
    """A registered, immutable version; only its stage (and which aliases point at it) changes."""

    model_name: str
    version: int
    stage: Stage
    format: str
    framework: str
    sha256: str
    size_bytes: int
    artifact_uri: str
    description: str
    source_run: str
    labels: Mapping[str, str]
    lineage: Lineage
    signature: rpb.ModelSignature
    training_statistics: tuple[spb.FeatureStatistics, ...]
    report: rpb.TrainingReport
    backend_hints: rpb.BackendHints
    aliases: tuple[str, ...]
    created_by: str
    created_us: int
    stage_updated_us: int
    # The checks of the latest promotion gates run on the version (empty before any).
    gate_results: tuple[rpb.GateResult, ...] = ()
    drift_policy: rpb.DriftPolicy | None = None  # None: registered without one, the defaults apply
    test_summary: rpb.TestSummary | None = None  # None: registered without a test report


@dataclass(frozen=True)
class AuditEntry:
    """One change: who (the authenticated identity), when, what and why."""

    id: int
    at_us: int
    identity: str
    action: str
    model_name: str
    version: int
    reason: str
    details: Mapping[str, str]


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing and the token of the next; empty when there is none."""

    items: list[T]
    next_page_token: str = ""


def default_score_output(record: VersionRecord) -> str:
    """The first output of the signature with a training histogram, else the first output."""
    summarised = {s.feature_name for s in record.training_statistics if s.numeric.HasField("histogram")}
    names = [o.name for o in record.signature.outputs]
    return next((n for n in names if n in summarised), names[0] if names else "")
