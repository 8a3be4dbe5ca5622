"""TLS by settings: the server's credentials (mTLS when a client CA is set), reloaded when its files
change, and the security of the calls a service makes to its peers (TLS, a client certificate, its
own bearer token)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from chassis.errors import InvalidArgument
from chassis.settings import ServiceSettings
from fresco.credentials import ClientSecurity, read_token

log = logging.getLogger(__name__)


def _public_bytes(key: Any) -> bytes:
    public: bytes = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return public


class CertificateFiles:
    """The server's certificate, key and client CA files. A certificate rotated on disk (by
    cert-manager, say) is served to new connections without a restart: gRPC asks before each
    handshake, and a changed, consistent set of files is loaded."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self._paths = [p for p in (cert, key, client_ca) if p is not None]
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._stamp = self._stamp_now()
        self.initial = self._configuration()

    def _stamp_now(self) -> tuple[tuple[int, int, int], ...]:
        stats = [path.stat() for path in self._paths]
        return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in stats)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        cert, key = self.cert.read_bytes(), self.key.read_bytes()
        try:
            leaf = x509.load_pem_x509_certificate(cert)
            private = serialization.load_pem_private_key(key, password=None)
        except ValueError as err:
            raise InvalidArgument(f"tls_cert_file/tls_key_file: not a PEM certificate and key ({err})") from None
        if _public_bytes(leaf.public_key()) != _public_bytes(private.public_key()):
            raise InvalidArgument(f"tls_key_file {self.key} is not the key of tls_cert_file {self.cert}")
        return grpc.ssl_server_certificate_configuration(
            [(key, cert)], root_certificates=self.client_ca.read_bytes() if self.client_ca else None
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The new configuration if the files changed and agree; None keeps the current one (also while
        a rotation is half-way: a certificate whose key is not written yet)."""
        try:
            stamp = self._stamp_now()
            if stamp == self._stamp:
                return None
            configuration = self._configuration()
        except (OSError, InvalidArgument) as err:
            log.warning("TLS files changed but cannot be used yet; serving the previous ones: %s", err)
            return None
        self._stamp = stamp
        log.info("TLS certificate reloaded from %s", self.cert)
        return configuration


def server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    """The server's TLS credentials, requiring client certificates when a client CA is set and
    following the files as they change; None for plaintext."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    files = CertificateFiles(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    # gRPC documents None from the fetcher as "keep the current configuration"; its stubs omit it.
    return grpc.dynamic_ssl_server_credentials(
        files.initial,
        files.fetch,  # type: ignore[arg-type]
        require_client_authentication=settings.tls_client_ca_file is not None,
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
