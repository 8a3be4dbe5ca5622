"""Experiment service settings: flags of `python -m experiment_service`, or `FRESCO_EXPERIMENT_SERVICE_*` variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, FilePath
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

    redis_url: str = ""
    """Redis URL of the per-arm statistics and of bandit units' first arms (e.g. redis://host:6379/0), shared by
    every replica of the service (and by gateways given the same Redis); empty means SQLite at <state-dir>/stats.db
    and <state-dir>/sticky.db (one replica). Run Redis with appendonly for acknowledged rows to survive a Redis
    crash."""
    stats_redis_prefix: str = "fresco:stats:"
    """Prefix of the statistics keys in Redis."""
    stats_snapshot_every_s: float = Field(default=60.0, gt=0)
    """While rows arrive, seconds between the snapshots of arm statistics the results history is drawn from."""
    model_manager_address: str = ""
    """host:port of the model manager: a running experiment holds its arms' versions there (warm, routable at
    weight 0), and a SHIP_TREATMENT decision declares the arm's version in the model's deployment (its gates, then
    its rollout). Empty: arms route only to versions served anyway, and such decisions are refused."""
    model_manager_token_file: FilePath | None = None
    """File holding the token presented to the model manager (a deployer's, to promote); default: the peer token."""
    model_manager_timeout_s: float = Field(default=10.0, gt=0)
    """Deadline of a call to the model manager."""
    ship_canary_dwell_s: float = Field(default=60.0, gt=0)
    """When a shipped version's model has no deployment yet, its canary holds 10% then 50% this long each."""

    bandit_tick_s: float = Field(default=1.0, gt=0)
    """Seconds between checks of which running bandits are due for re-weighting (each on its update_interval)."""

    follow_s: float = Field(default=1.0, gt=0)
    """Seconds between reads of the registry's configuration revision: what other replicas of the service on the
    same database committed reaches this replica's gateways."""

    def registry_url(self) -> str:
        """The database URL to use."""
        return self.database_url or sqlite_url(self.state_dir / "experiments.db")
