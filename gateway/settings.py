"""Gateway settings: flags of `python -m gateway`, or `FRESCO_GATEWAY_*` variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, FilePath
from pydantic_settings import SettingsConfigDict

from chassis.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    """Settings of the gateway."""

    model_config = SettingsConfigDict(env_prefix="FRESCO_GATEWAY_", cli_prog_name="python -m gateway")

    predictor: str | None = None
    """host:port of the predictor serving every model without a route of its own."""
    feature_service: str | None = None
    """host:port of the feature service, for predictions that name entity keys instead of features."""
    feature_timeout_s: float = 2.0
    """Deadline of a call to the feature service when the caller set none (with one, each call gets what remains)."""
    routes_file: Path | None = None
    """YAML file of static routes: a list of {model, predictors: [host:port, ...]}."""
    predictor_timeout_s: float = 5.0
    """Deadline of a call to a predictor when the caller set none (with one, each call gets what remains)."""
    metadata_ttl_s: float = 30.0
    """How long the signature (tensor names, shapes, feature order) of a version a caller names is cached."""
    default_version_ttl_s: float = 1.0
    """How long the version a predictor serves by default (and its signature) is cached: after a reload
    that changes it, calls without a version may still go to the previous default, pinned, this long."""
    max_batch_requests: int = Field(default=50_000, ge=1)
    """Most predictions one PredictBatch may ask for; more is INVALID_ARGUMENT."""
    max_bytes_elements: int = Field(default=100_000, ge=1)
    """Most string elements in one string-list feature or one BYTES tensor built; more is INVALID_ARGUMENT."""
    offload_above_bytes: int = Field(default=256 * 1024, ge=0)
    """Calls whose decoding, tensors or answers weigh more than this many bytes do that work in a worker thread."""
    merge_in_flight: int = Field(default=1, ge=0)
    """Calls to one predictor version (same outputs) on their way at once before further requests wait and go
    together in the next call, their answers split back per request (`gateway.coalesce`); 0 sends every request
    on its own call. Unsampled calls only: a sampled one keeps its own call and client span."""
    merge_max_rows: int = Field(default=256, ge=1)
    """Most rows one merged call carries."""
    model_manager_address: str | None = None
    """host:port of the model manager: routes come from its WatchRoutes stream and metric windows go to it.
    Without it the gateway routes statically (--predictor, --routes-file) as before."""
    model_manager_token_file: FilePath | None = None
    """File holding the token presented to the model manager (a deployer's, for ReportMetrics); default: the peer
    token."""
    gateway_id: str = ""
    """This gateway's id on the route stream and in metric reports; empty means host-pid."""
    state_dir: Path | None = None
    """Directory keeping the last good route table, so a restarted gateway serves while the manager is down."""
    route_backoff_max_s: float = Field(default=5.0, gt=0)
    """Longest wait between attempts to reconnect the route stream (the wait doubles from 0.1 s)."""
    shadow_queue_size: int = Field(default=100, ge=1)
    """Mirrored requests waiting at most; more are dropped and counted."""
    shadow_workers: int = Field(default=2, ge=1)
    """Mirrored calls in flight at most."""
    shadow_timeout_s: float = Field(default=2.0, gt=0)
    """Deadline of one mirrored call, its own, never the caller's."""
    report_attempts: int = Field(default=6, ge=1)
    """Attempts to report a metric window (retried with the same id) before it is dropped and counted."""
    value_sketches: bool = True
    """Sketch each routed version's inputs and score output in its metric windows, for drift
    (`--no-value-sketches` turns it off, e.g. to measure what it costs)."""
    prediction_records_per_window: int = Field(default=10_000, ge=0)
    """Predictions kept per metric window and version (request id, time, score, unit id) for joining late
    labels; more are counted in the window's prediction_records_dropped."""
    experiment_service: str | None = None
    """host:port of the experiment service: the assignment configuration comes from its WatchExperiments stream
    (kept in --state-dir) and exposures go to it. Without it the gateway assigns no experiments."""
    experiment_service_token_file: FilePath | None = None
    """File holding the token presented to the experiment service (one allowed to log exposures); default: the
    peer token."""
    sticky_redis_url: str | None = None
    """Redis URL where bandit units keep their first arm, shared by every gateway; default: SQLite in --state-dir
    (in memory without one), for this host's gateways only."""
    exposure_queue: int = Field(default=10_000, ge=1)
    """Exposures waiting to be sent at most (kept while the experiment service is down); more are dropped and
    counted."""
