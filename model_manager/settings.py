"""Model manager settings: flags of `python -m model_manager`, or `FRESCO_MODEL_MANAGER_*` variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from chassis.errors import InvalidArgument
from chassis.settings import ServiceSettings
from model_manager import alert_rules, gate_config
from model_manager.tables import sqlite_url


class ModelManagerSettings(ServiceSettings):
    """Settings of the model manager."""

    model_config = SettingsConfigDict(env_prefix="FRESCO_MODEL_MANAGER_", cli_prog_name="python -m model_manager")

    data_dir: Path = Path("fresco-models")
    """Directory of the embedded registry database (registry.db) and the default artifact store (artifacts/)."""
    database_url: str = ""
    """SQLAlchemy URL of the registry database; empty means SQLite at <data-dir>/registry.db. For production:
    postgresql+psycopg://user:password@host:5432/dbname."""
    artifact_store_url: str = ""
    """fsspec URL of the content-addressed artifact store; empty means the directory <data-dir>/artifacts."""
    max_artifact_bytes: int = Field(default=4 * 1024**3, ge=1)
    """Largest artifact an upload may carry; a larger one is refused (INVALID_ARGUMENT) and nothing is kept."""
    connect_retry_s: float = Field(default=2.0, gt=0)
    """At start, seconds between attempts to reach the database (health stays NOT_SERVING meanwhile)."""

    metrics_window_s: float = Field(default=10.0, gt=0, le=3600)
    """Length of the metric windows gateways report, published to them in the route table, in seconds."""
    heartbeat_interval_s: float = Field(default=2.0, gt=0)
    """How often predictors are told to heartbeat, in seconds."""
    predictor_lease_s: float = Field(default=10.0, gt=0)
    """Seconds without a heartbeat after which a predictor is LOST: out of routes, its copies placed elsewhere."""
    predictor_load_timeout_s: float = Field(default=120.0, gt=0)
    """Deadline of one RepositoryModelLoad (load and warm-up) on a predictor, in seconds."""
    copy_request_rate: float = Field(default=50.0, gt=0)
    """Requests per second one copy of a version serves before another copy is placed (up to max_replicas)."""
    leftover_grace_s: float = Field(default=30.0, ge=0)
    """Seconds a copy no route, rollout or gate wants (say, left by a restarted manager) stays before it is unloaded."""
    feature_service_address: str = ""
    """host:port of the feature service whose views the schema gate checks feature refs against, and whose parity
    counts the model monitor shows; empty: none."""
    feature_service_timeout_s: float = Field(default=10.0, gt=0)
    """Deadline of each call the schema gate makes to the feature service."""
    default_gates_json: str = '{"schema": {}, "drift": {}}'
    """The promotion gates run when a PromoteModelVersion request sets none: PromotionGates as protobuf JSON. The
    drift gate passes (with a note) while too little live data is there to judge."""
    latency_sample_requests: int = Field(default=200, ge=1)
    """Requests the latency gate times when its request does not say (sample_requests 0)."""
    latency_warmup_requests: int = Field(default=20, ge=0)
    """Untimed requests the latency gate sends first when its request does not say (warmup_requests 0)."""
    drift_refresh_s: float = Field(default=5.0, gt=0, le=300)
    """How often the drift gauges on /metrics are computed again from the merged sketches, in seconds."""
    alert_rules: list[Path] = Field(default=[])
    """Prometheus rule files whose alerting rules count as monitoring in the safety score (repeat the flag)."""

    prediction_retention_s: float = Field(default=7 * 86400.0, gt=0)
    """Seconds a served prediction is kept for its late label (and its quality judged); older ones are forgotten."""
    quality_refresh_s: float = Field(default=30.0, gt=0)
    """How often the prediction quality gauges are recomputed and old predictions forgotten, in seconds."""

    @field_validator("default_gates_json")
    @classmethod
    def _gates_parse(cls, value: str) -> str:
        try:
            gate_config.parse_defaults(value)
        except InvalidArgument as err:  # refused at start, with the reason, rather than on the first promotion
            raise ValueError(str(err)) from err
        return value

    @field_validator("alert_rules")
    @classmethod
    def _rules_parse(cls, value: list[Path]) -> list[Path]:
        try:
            alert_rules.load_rules(value)
        except alert_rules.AlertRulesError as err:  # refused at start, naming the file and the rule
            raise ValueError(str(err)) from err
        return value

    def registry_url(self) -> str:
        """The database URL to use."""
        return self.database_url or sqlite_url(self.data_dir / "registry.db")

    def artifacts_url(self) -> str:
        """The artifact store URL to use."""
        return self.artifact_store_url or str(self.data_dir / "artifacts")
