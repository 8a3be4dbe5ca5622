"""Feature service settings: flags of `python -m feature_service`, or `FRESCO_FEATURE_SERVICE_*` variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from chassis.settings import ServiceSettings


class FeatureServiceSettings(ServiceSettings):
    """Settings of the feature service."""

    model_config = SettingsConfigDict(env_prefix="FRESCO_FEATURE_SERVICE_", cli_prog_name="python -m feature_service")

    definitions: Path = Path("features.yaml")
    """YAML file of entities and feature views (see examples/features/definitions.yaml)."""
    backend: Literal["sqlite", "redis+cassandra"] = "sqlite"
    """Online store: sqlite (one embedded file, no servers needed) or redis+cassandra; both behind an
    in-process memory tier."""
    sqlite_path: Path = Path("fresco-features.db")
    """With backend sqlite, the database file (created if missing; WAL mode, fsync at every commit)."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """With backend redis+cassandra, the Redis cache in front of Cassandra (with redis_cluster, any one node)."""
    redis_cluster: bool = False
    """With backend redis+cassandra, redis_url names a node of a Redis Cluster: the client discovers the others,
    reads many keys as one pipeline of an MGET per hash slot, and publishes and subscribes for invalidation
    through one node at a time. Keys are the same as on a single Redis."""
    cassandra_contact_points: list[str] = Field(default=["127.0.0.1"])
    """With backend redis+cassandra, Cassandra hosts to connect to (repeat the flag)."""
    cassandra_port: int = 9042
    """With backend redis+cassandra, Cassandra's CQL port."""
    cassandra_keyspace: str = "fresco_features"
    """With backend redis+cassandra, the keyspace holding records and statistics (created if missing)."""
    memory_max_entries: int = Field(default=100_000, ge=0)
    """Records the in-process memory tier keeps (least recently used go first); 0 turns it off."""
    memory_ttl_s: float = Field(default=30.0, gt=0)
    """How long the memory tier may serve a record before reading it again from the tier behind it."""
    connect_retry_s: float = Field(default=2.0, gt=0)
    """At start, seconds between attempts to reach the durable tier (health stays NOT_SERVING meanwhile)."""
    statistics_poll_s: float = Field(default=5.0, gt=0)
    """Seconds between checks for statistics written by another process (`fresco features materialize`
    run in process); a change reloads the view's baselines, bloom filter and memory tier."""
    max_future_s: float = Field(default=300.0, ge=0)
    """Pushed rows whose event timestamp is further ahead of the server clock than this are rejected."""
    require_event_timestamp: bool = False
    """Reject pushed rows without an event timestamp (by default they get the server receive time)."""
    max_rejections_reported: int = Field(default=100, ge=0)
    """Rejected rows described in a push or materialize answer (their count is always exact)."""
    materialize_chunk_rows: int = Field(default=1000, ge=1)
    """Materialisation writes entity rows to the store in batches of this many (5000-row batches
    timed out against a fresh single Cassandra node on 2 cores)."""
    materialize_source_dirs: list[Path] = Field(default=[])
    """The Materialize RPC reads only files under these directories (repeat the flag; symlinks and `..` are
    resolved first). None given: the RPC refuses every file (FAILED_PRECONDITION)."""
    max_values_per_get: int = Field(default=2_000_000, ge=1)
    """GetFeatures answers at most this many values (entity keys × feature refs) per call; larger calls get
    INVALID_ARGUMENT naming this setting."""
    redis_ttl_s: float = Field(default=3600.0, gt=0)
    """With backend redis+cassandra, how long Redis keeps a cached record (or a floor, see the README)."""
    redis_miss_poll_s: float = Field(default=1.0, gt=0)
    """With backend redis+cassandra, seconds between reads of the durable log of writes a replica could not
    send to Redis: the bound on how long another replica may serve a value such a write replaced."""
    bloom_refresh_s: float = Field(default=300.0, gt=0)
    """Seconds between rebuilds of the bloom filters from the durable tier: the bound on how long a key that
    is durable may be reported NOT_FOUND by a replica that missed its write (lost notice, crashed writer)."""
    parity_sample_rate: float = Field(default=0.01, ge=0, le=1)
    """Share of served entities whose values are compared with the offline path (online-offline parity),
    chosen by a hash of the entity key (the same ones every time); 0 turns the check off."""
    parity_queue_size: int = Field(default=10_000, ge=1)
    """Sampled entities waiting for the parity check; when full, new samples are dropped (and counted)."""
    parity_max_entities: int = Field(default=100_000, ge=1)
    """Sampled entities whose offline rows the parity check holds in memory per view."""
    parity_offline_definitions: Path | None = None
    """Definitions the offline side of the parity check resolves with (e.g. the training pipeline's copy);
    by default the served ones. Every served view and feature must be in it."""
