"""Settings shared by every service. Each service subclasses `ServiceSettings` with its own env prefix
(`FRESCO_<SERVICE>_`); every field is also a command-line flag whose help is the field's docstring."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Self, TypeVar

from pydantic import FilePath, model_validator
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
    health_port: int = -1
    """Port of a second, plaintext server answering only grpc.health.v1, for probes that cannot speak TLS
    (Kubernetes' native gRPC probes); -1 turns it off, 0 picks a free port. Health is open to all anyway."""
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

    auth_tokens_file: FilePath | None = None
    """File of static bearer tokens, one `name:role:sha256hex` a line (roles viewer, deployer, admin).
    With this or a JWT key set, protected methods need a token; with neither, auth is off."""
    auth_jwt_secret_file: FilePath | None = None
    """File holding the shared secret (32 bytes or more) of HS256-signed JWT bearer tokens."""
    auth_jwt_public_key_file: FilePath | None = None
    """PEM public key of RS256/ES256-signed JWT bearer tokens (RSA, EC P-256/384/521 or Ed25519)."""
    auth_jwt_audience: str | None = None
    """The `aud` a JWT must carry; required when a JWT key is set."""
    auth_jwt_issuer: str | None = None
    """The `iss` a JWT must carry, if set."""
    auth_jwt_roles_claim: str = "roles"
    """JWT claim naming the caller's role (a string or a list; the highest known role counts)."""
    auth_jwt_leeway_s: float = 30.0
    """Clock skew tolerated on a JWT's exp and nbf, in seconds."""
    auth_require_for_reads: bool = False
    """Also require a token (role viewer or higher) on reads: predictions, features, metadata, reflection."""
    peer_token_file: FilePath | None = None
    """File holding the bearer token this service presents on its calls to other services."""

    tls_cert_file: FilePath | None = None
    """PEM certificate chain of the gRPC server; with tls_key_file the server speaks only TLS."""
    tls_key_file: FilePath | None = None
    """PEM private key of tls_cert_file."""
    tls_client_ca_file: FilePath | None = None
    """PEM CA bundle: the server then requires client certificates signed by it (mTLS)."""
    peer_tls_ca_file: FilePath | None = None
    """PEM CA bundle to verify other services' certificates: calls to them then use TLS."""
    peer_tls_cert_file: FilePath | None = None
    """PEM client certificate presented to other services (for their mTLS)."""
    peer_tls_key_file: FilePath | None = None
    """PEM private key of peer_tls_cert_file."""
    peer_tls_server_name: str | None = None
    """Name expected in peers' certificates when it differs from the host dialled."""

    @model_validator(mode="after")
    def _security_settings_agree(self) -> Self:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
        if (self.peer_tls_cert_file is None) != (self.peer_tls_key_file is None):
            raise ValueError("peer_tls_cert_file and peer_tls_key_file go together: set both or neither")
        if self.peer_tls_cert_file is not None and self.peer_tls_ca_file is None:
            raise ValueError("peer_tls_cert_file needs peer_tls_ca_file (the CA that signed the peers)")
        jwt_key = self.auth_jwt_secret_file is not None or self.auth_jwt_public_key_file is not None
        if jwt_key and not self.auth_jwt_audience:
            raise ValueError(
                "auth_jwt_audience is required with a JWT key: without it, tokens minted for other services pass"
            )
        return self

    @property
    def auth_enabled(self) -> bool:
        """Whether a token source is configured (otherwise every method is open, as on a laptop)."""
        return any(
            path is not None
            for path in (self.auth_tokens_file, self.auth_jwt_secret_file, self.auth_jwt_public_key_file)
        )


SettingsT = TypeVar("SettingsT", bound=ServiceSettings)


def parse_settings(cls: type[SettingsT], argv: Sequence[str]) -> SettingsT:
    """Settings from flags, then `FRESCO_<SERVICE>_*` environment variables, then defaults."""
    return CliApp.run(cls, cli_args=list(argv))
