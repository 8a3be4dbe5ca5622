"""How a client reaches a Fresco service: TLS (with a client certificate for mTLS) and a bearer token.
Used by the SDK, the CLI and the services' own calls to each other; imports nothing from the servers."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

AUTHORIZATION = "authorization"


def read_token(path: Path) -> str:
    """A bearer token kept in a file (surrounding whitespace dropped); ValueError for an empty one."""
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"{path}: expected a bearer token, the file is empty")
    return token


@dataclass(frozen=True)
class ClientSecurity:
    """TLS files and the bearer token of a client; all empty means plaintext without a token."""

    token: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    @classmethod
    def from_env(cls, token_file: Path | None = None) -> ClientSecurity:
        """From `token_file`, else FRESCO_TOKEN or FRESCO_TOKEN_FILE, and FRESCO_TLS_CA_FILE,
        FRESCO_TLS_CERT_FILE, FRESCO_TLS_KEY_FILE, FRESCO_TLS_SERVER_NAME."""
        env = os.environ
        path = token_file or (Path(env["FRESCO_TOKEN_FILE"]) if env.get("FRESCO_TOKEN_FILE") else None)
        token = read_token(path) if path is not None else env.get("FRESCO_TOKEN") or None

        def file(name: str) -> Path | None:
            return Path(env[name]) if env.get(name) else None

        return cls(
            token=token,
            ca_file=file("FRESCO_TLS_CA_FILE"),
            cert_file=file("FRESCO_TLS_CERT_FILE"),
            key_file=file("FRESCO_TLS_KEY_FILE"),
            server_name=env.get("FRESCO_TLS_SERVER_NAME") or None,
        )

    @property
    def tls(self) -> bool:
        """Whether channels use TLS."""
        return self.ca_file is not None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """TLS credentials verifying the server against `ca_file`, presenting the client certificate if any."""
        if self.ca_file is None:
            raise ValueError("TLS needs a CA file to verify the server against")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=self.key_file.read_bytes() if self.key_file else None,
            certificate_chain=self.cert_file.read_bytes() if self.cert_file else None,
        )

    def options(self) -> list[tuple[str, Any]]:
        """Channel options this security needs (the name to expect in the server's certificate)."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.tls and self.server_name else []

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Per-call metadata carrying the bearer token, if any."""
        return ((AUTHORIZATION, f"Bearer {self.token}"),) if self.token else ()

    def channel(self, target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A blocking channel to `target` (the token is not added: pass `metadata()` on each call)."""
        all_options = [*options, *self.options()]
        if self.tls:
            return grpc.secure_channel(target, self.channel_credentials(), options=all_options)
        return grpc.insecure_channel(target, options=all_options)

    def aio_channel(
        self,
        target: str,
        options: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[aio.ClientInterceptor] = (),
        tls: bool = True,
    ) -> aio.Channel:
        """An asyncio channel to `target` that adds the bearer token to every call (unless the call
        carries its own); `tls=False` for local transports such as unix sockets."""
        chain = [*interceptors, *([BearerToken(self.token)] if self.token else [])]
        if self.tls and tls:
            return aio.secure_channel(
                target, self.channel_credentials(), options=[*options, *self.options()], interceptors=chain
            )
        return aio.insecure_channel(target, options=list(options), interceptors=chain)


class BearerToken(
    aio.UnaryUnaryClientInterceptor,
    aio.UnaryStreamClientInterceptor,
    aio.StreamUnaryClientInterceptor,
    aio.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to each call that carries no authorization of its own."""

    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    def _details(self, details: aio.ClientCallDetails) -> aio.ClientCallDetails:
        metadata = aio.Metadata(*(tuple(details.metadata) if details.metadata else ()))
        if not any(key == AUTHORIZATION for key, _ in metadata):
            metadata.add(AUTHORIZATION, self._header)
        return aio.ClientCallDetails(
            method=details.method,
            timeout=details.timeout,
            metadata=metadata,
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
        )

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request)

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request)

    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: aio.ClientCallDetails, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)

    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: aio.ClientCallDetails, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)
