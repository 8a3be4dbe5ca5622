"""Fixtures and builders the registry tests share: a registry on SQLite and on a real PostgreSQL, and specs."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fresco.api.features.v1 import statistics_pb2 as spb
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.servers import PostgresServer
from fresco.servers.pytest_plugin import postgres_server
from model_manager.records import Lineage, ModelSpec, StoredArtifact, VersionSpec
from model_manager.registry import Registry
from model_manager.tables import sqlite_url

__all__ = ["database_url", "postgres_server", "registry"]


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty registry database of this test's own: an SQLite file, or a new database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "registry.db")
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database(f"registry_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def registry(database_url: str) -> Iterator[Registry]:
    """A registry on `database_url`, its tables created."""
    opened = Registry.open(database_url)
    yield opened
    opened.close()


def artifact(content: bytes) -> StoredArtifact:
    """A stored artifact as the store would describe these bytes."""
    digest = hashlib.sha256(content).hexdigest()
    return StoredArtifact(digest, len(content), f"file:///artifacts/sha256/{digest[:2]}/{digest}", True)


def signature() -> rpb.ModelSignature:
    """A one-input, one-output signature reading two features."""
    return rpb.ModelSignature(
        inputs=[rpb.TensorSpec(name="features", datatype="FP32", shape=[-1, 2])],
        outputs=[rpb.TensorSpec(name="probability", datatype="FP32", shape=[-1, 2])],
        feature_refs=["users:age", "users:spend"],
        feature_input="features",
    )


def statistics() -> tuple[spb.FeatureStatistics, ...]:
    """Training statistics of two features, one with percentiles and a histogram."""
    age = spb.FeatureStatistics(
        feature_name="users:age",
        count=1000,
        null_count=10,
        null_rate=0.01,
        numeric=spb.NumericStatistics(
            mean=41.5,
            stddev=12.0,
            min=18,
            max=90,
            percentiles=[spb.Percentile(quantile=q, value=v) for q, v in ((0.01, 19), (0.5, 40), (0.99, 85))],
            histogram=spb.Histogram(bucket_bounds=[30, 50, 70], bucket_counts=[200, 500, 250, 40]),
        ),
    )
    plan = spb.FeatureStatistics(
        feature_name="users:plan",
        count=1000,
        categorical=spb.CategoricalStatistics(
            distinct_count=2, top_categories=[spb.CategoryCount(value="a", count=700, fraction=0.7)]
        ),
    )
    return age, plan


def report() -> rpb.TrainingReport:
    """An evaluation report with metrics, calibration, slices and importances."""
    return rpb.TrainingReport(
        metrics={"auc": 0.91, "logloss": 0.32},
        feature_importance={"users:age": 0.7, "users:spend": 0.3},
        calibration=rpb.Calibration(
            bins=[rpb.CalibrationBin(lower=0.0, upper=0.5, mean_predicted=0.2, observed_rate=0.22, count=600)],
            expected_calibration_error=0.02,
            brier_score=0.11,
        ),
        slices=[rpb.SliceMetrics(slice="country=FR", count=120, metrics={"auc": 0.88})],
        evaluation_dataset_uri="file:///data/eval.parquet",
        evaluation_dataset_sha256="b" * 64,
    )


def model_spec(name: str = "churn", **overrides: object) -> ModelSpec:
    """A valid model to create."""
    values: dict[str, object] = {
        "name": name,
        "owner": "risk-team",
        "description": "who leaves next month",
        "labels": {"team": "risk"},
        "signature": signature(),
    }
    return ModelSpec(**{**values, **overrides})  # type: ignore[arg-type]


def version_spec(model: str, content: bytes, **overrides: object) -> VersionSpec:
    """A valid version of `model` whose artifact is `content`, with lineage, statistics, report and hints."""
    values: dict[str, object] = {
        "model_name": model,
        "format": "onnx",
        "expected_sha256": hashlib.sha256(content).hexdigest(),
        "expected_size_bytes": len(content),
        "framework": "sklearn 1.5",
        "labels": {"run": "nightly"},
        "lineage": Lineage(code_commit="abc123", dataset_uri="file:///data/train.parquet", dataset_sha256="a" * 64),
        "signature": signature(),
        "training_statistics": statistics(),
        "report": report(),
        "backend_hints": rpb.BackendHints(preferred_backend="onnxruntime", expected_memory_bytes=64 << 20),
    }
    return VersionSpec(**{**values, **overrides})  # type: ignore[arg-type]
