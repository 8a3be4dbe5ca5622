"""Predictor settings: flags of `python -m predictor`, or `FRESCO_PREDICTOR_*` variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, FilePath
from pydantic_settings import SettingsConfigDict

from chassis.settings import DEFAULT_MAX_MESSAGE_BYTES, ServiceSettings


class PredictorSettings(ServiceSettings):
    """Settings of the predictor."""

    model_config = SettingsConfigDict(env_prefix="FRESCO_PREDICTOR_", cli_prog_name="python -m predictor")

    model_repository: Path = Path("models")
    """Directory of models: <repo>/<model>/config.yaml and <repo>/<model>/<version>/model.onnx."""
    inference_threads: int = 2
    """Threads running inference and model loads off the event loop."""
    inline_below_us: int = 100
    """Batches whose measured compute time is below this many microseconds run on the event loop:
    handing them to a thread and back costs more (100-200 us on a 2-core VM) than running them.
    Each batch size runs off the loop until measured; 0 keeps all inference off the loop."""
    gil_switch_interval_us: int = 500
    """How soon an inference thread that finished gets the GIL back from a busy event loop
    (Python's default, 5000, can hold a finished result up to 5 ms)."""
    onnx_intra_op_threads: int = 1
    """ONNX Runtime intra-op threads per session (1 is fastest for small models)."""
    model_control_mode: Literal["none", "explicit", "poll"] = "none"
    """none: load every model at start; explicit: load only --load-model ones, the rest through
    RepositoryModelLoad; poll: load every model at start and follow the directory's changes.
    As in Triton, RepositoryModelLoad and RepositoryModelUnload are refused unless explicit."""
    load_model: list[str] = Field(default_factory=list)
    """In explicit mode, models to load at start (repeat the flag; '*' means all)."""
    repository_poll_s: float = 5.0
    """In poll mode, seconds between scans of the model repository."""
    max_bytes_elements: int = Field(default=1 << 20, ge=1)
    """BYTES elements one input tensor may hold; more is INVALID_ARGUMENT naming this setting."""
    trt_engine_cache_dir: Path | None = None
    """Where serialized TensorRT engines are cached (default ~/.cache/fresco/trt-engines)."""
    shared_weights_min_bytes: int = Field(default=16 << 20, ge=0)
    """ONNX models at least this large (file size) run on the CPU from an optimised copy under
    --shared-weights-dir whose weights every process maps from one file, so that the workers of
    --workers N (and other predictors on the machine) hold them once; 0 turns this off."""
    shared_weights_dir: Path | None = None
    """Where those copies are kept, one per model file and machine (default ~/.cache/fresco/shared-weights)."""
    http_port: int = Field(default=0, ge=-1)
    """Port of the Open Inference Protocol's REST form (KServe v2 over HTTP, as Triton's and MLServer's);
    0 picks a free port and prints it, -1 turns it off. TLS and bearer tokens as on the gRPC port."""
    http_max_request_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, ge=1)
    """Largest HTTP request body accepted, in bytes (413 beyond it)."""
    workers: int = Field(default=1, ge=1)
    """Server processes sharing the port (SO_REUSEPORT); repository calls reach every one of them."""
    worker_index: int | None = None
    """Internal, set by the supervisor of --workers: this worker's index."""
    peers_dir: Path | None = None
    """Internal, set by the supervisor of --workers: where workers find each other's sockets."""
    supervisor_pid: int = Field(default=0, ge=0)
    """Internal, set by the supervisor of --workers: a worker stops when this process dies."""
    sync_from_peers: bool = False
    """Internal, set by the supervisor of --workers on a restart: load the models a sibling serves."""

    model_manager_address: str = ""
    """host:port of the model manager to register with and heartbeat to; empty: not part of a fleet."""
    predictor_id: str = ""
    """This predictor's id in the fleet, stable across its restarts; empty: <hostname>-<port>."""
    zone: str = ""
    """Failure domain this predictor runs in; the manager spreads copies of a version across zones."""
    advertise_address: str = ""
    """IP:port the manager and gateways reach this predictor at; empty: --host and the bound port."""
    memory_capacity_bytes: int = Field(default=0, ge=0)
    """Memory models may take here, as reported to the manager for placement; 0: the machine's physical memory."""
    predictor_labels: dict[str, str] = Field(default_factory=dict)
    """Free-form tags reported to the manager (JSON object), e.g. {"hardware": "t4"}."""
    model_manager_token_file: FilePath | None = None
    """File holding the bearer token (role deployer) presented to the model manager; default: peer_token_file.
    TLS to the manager follows the peer_tls_* settings."""
