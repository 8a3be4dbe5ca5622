"""Experiment service settings: flags of `python -m experiment_service`, or `FRESCO_EXPERIMENT_SERVICE_*` variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from chassis.settings import ServiceSettings
from model_manager.tables import sqlite_url


class ExperimentServiceSettings(ServiceSettings):
    """Settings of the experiment service."""

    model_config = SettingsConfigDict(
        env_prefix="FRESCO_EXPERIMENT_SERVICE_", cli_prog_name="python -m experiment_service"
    )

    state_dir: Path = Path("fresco-experiments")
    """Directory of the embedded databases (experiments.db for the registry)."""
    database_url: str = ""
    """SQLAlchemy URL of the experiment registry; empty means SQLite at <state-dir>/experiments.db. For production:
    postgresql+psycopg://user:password@host:5432/dbname."""
    connect_retry_s: float = Field(default=2.0, gt=0)
    """At start, seconds between attempts to reach the database (health stays NOT_SERVING meanwhile)."""
    max_assign_units: int = Field(default=10_000, ge=1)
    """Most units one Assign call may carry."""

    def registry_url(self) -> str:
        """The database URL to use."""
        return self.database_url or sqlite_url(self.state_dir / "experiments.db")
