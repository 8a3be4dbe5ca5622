"""Channels for the gateway's hot hop, calls to predictors whose trace is not sampled: without client
interceptors (grpc.aio runs each call through them in a task of its own and copies the call's details per
interceptor), the peer token and the trace context sent as call metadata instead. A sampled call keeps the
service's traced channel and its client span."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from grpc import aio

from chassis.tracing import inject_context
from fresco.credentials import ClientSecurity


@dataclass(frozen=True)
class LeanChannels:
    """Uninterceptable channels with the peer security of `security`, and the metadata each call carries."""

    security: ClientSecurity
    options: Sequence[tuple[str, Any]] = ()

    def channel(self, target: str) -> aio.Channel:
        """A channel to `target` with the peer's TLS (a unix socket stays plaintext) and no interceptor."""
        untokened = replace(self.security, token=None)
        return untokened.aio_channel(target, options=self.options, tls=not target.startswith("unix:"))

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What one call sends: the peer token and the current trace context (W3C traceparent)."""
        return (*self.security.metadata(), *inject_context().items())
