"""Who is calling: the identity every audit record and operation carries."""

from __future__ import annotations

from typing import Any, TypeAlias

from grpc import aio

from chassis.auth import current_identity

Context: TypeAlias = aio.ServicerContext[Any, Any]
ANONYMOUS = "anonymous"


def caller_identity(context: Context) -> str:
    """Who is calling, as verified: the bearer token's subject (chassis auth), else the TLS client
    certificate's identity, else "anonymous". Never a name the client wrote in the request: the audit
    log records this."""
    identity = current_identity()
    if identity is not None:
        return identity.subject
    identities = context.peer_identities()
    if identities:
        return b",".join(identities).decode(errors="replace")
    return ANONYMOUS
