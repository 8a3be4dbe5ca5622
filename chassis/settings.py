"""Settings shared by every service. Each service subclasses `ServiceSettings` with its own env prefix
(`FRESCO_<SERVICE>_`); every field is also a command-line flag whose help is the field's docstring."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypeVar

from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class ServiceSettings(BaseSettings):
    """Network, limits and telemetry settings every Fresco service has."""

    model_config = SettingsConfigDict(
        use_attribute_docstrings=True,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        extra="ignore",
    )

    host: str = "127.0.0.1"
    """Address the gRPC server listens on."""
    port: int = 0
    """gRPC port; 0 picks a free port and prints it."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Largest gRPC message accepted or sent, in bytes (never gRPC's 4 MiB default)."""
    grace_period_s: float = 10.0
    """On SIGTERM, how long in-flight calls may take to finish before they are cancelled."""
    metrics_port: int = 0
    """Port of the Prometheus /metrics HTTP endpoint; 0 picks a free port, -1 turns it off."""
    tracing_exporter: Literal["none", "console", "otlp"] = "none"
    """Where spans go: nowhere, the console, or an OTLP/gRPC collector."""
    otlp_endpoint: str = "127.0.0.1:4317"
    """Address of the OTLP/gRPC collector when tracing_exporter is otlp."""
    log_level: str = "INFO"
    """Log level (DEBUG, INFO, WARNING, ERROR)."""
    log_format: Literal["json", "text"] = "json"
    """Log line format: one JSON object per line, or plain text."""


SettingsT = TypeVar("SettingsT", bound=ServiceSettings)


def parse_settings(cls: type[SettingsT], argv: Sequence[str]) -> SettingsT:
    """Settings from flags, then `FRESCO_<SERVICE>_*` environment variables, then defaults."""
    return CliApp.run(cls, cli_args=list(argv))
