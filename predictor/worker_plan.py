"""Where the processes of `--workers N` meet: the plan the supervisor runs its workers by, and the
unix socket each worker listens on for its siblings. Nothing here imports pydantic or gRPC: the
supervisor holds only this and the standard library (plus prometheus_client for its metrics)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Self


@dataclass(frozen=True)
class WorkerPlan:
    """The settings the supervisor itself acts on; the workers parse the full flags themselves."""

    host: str
    port: int
    workers: int
    metrics_port: int
    grace_period_s: float
    http_port: int = -1
    http_tls: bool = False  # whether the HTTP port speaks TLS, for the URL the supervisor announces

    @classmethod
    def of(cls, settings: Any) -> Self:
        """The plan of parsed predictor settings (a `PredictorSettings`)."""
        taken = {field.name: getattr(settings, field.name) for field in fields(cls) if field.name != "http_tls"}
        return cls(**taken, http_tls=settings.tls_cert_file is not None)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Self:
        return cls(**json.loads(text))


def socket_path(peers_dir: Path, index: int) -> Path:
    """The unix socket a worker listens on for its siblings."""
    return peers_dir / f"worker-{index}.sock"
