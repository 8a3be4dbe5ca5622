"""TLS by settings: the server's credentials (mTLS when a client CA is set) and the security of the
calls a service makes to its peers (TLS, a client certificate, its own bearer token)."""

from __future__ import annotations

import grpc

from chassis.settings import ServiceSettings
from fresco.credentials import ClientSecurity, read_token


def server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    """The server's TLS credentials, requiring client certificates when a client CA is set; None for plaintext."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def peer_security(settings: ServiceSettings) -> ClientSecurity:
    """How this service reaches its peers: TLS files and the token of the peer settings."""
    return ClientSecurity(
        token=read_token(settings.peer_token_file) if settings.peer_token_file else None,
        ca_file=settings.peer_tls_ca_file,
        cert_file=settings.peer_tls_cert_file,
        key_file=settings.peer_tls_key_file,
        server_name=settings.peer_tls_server_name,
    )
