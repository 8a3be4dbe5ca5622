"""How the client SDK makes a call: one channel per client (TLS and the bearer token as `ClientSecurity` says),
and per call a deadline and the caller's W3C trace context (`traceparent`, `tracestate`, `baggage` metadata), so
that Fresco's spans join the calling service's trace. Imports no tracing library: a caller using OpenTelemetry
passes what `opentelemetry.propagate.inject(carrier)` fills."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

import grpc
from grpc import aio

from fresco.credentials import ClientSecurity

# Gateway answers are small; anything slower than this is an outage, not a slow model.
DEFAULT_TIMEOUT_S = 10.0
TRACEPARENT = "traceparent"
TRACE_KEYS = (TRACEPARENT, "tracestate", "baggage")
# W3C Trace Context: version-trace_id-parent_id-flags in lowercase hex; version ff is invalid.
_TRACEPARENT = re.compile(r"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")

Metadata = tuple[tuple[str, str], ...]


def trace_metadata(trace: Mapping[str, str] | None) -> Metadata:
    """The caller's trace context as call metadata; ValueError naming the key for a malformed one."""
    if not trace:
        return ()
    unknown = sorted(set(trace) - set(TRACE_KEYS))
    if unknown:
        raise ValueError(f"trace: unexpected keys {unknown}; expected {list(TRACE_KEYS)}")
    traceparent = trace.get(TRACEPARENT, "")
    if not _TRACEPARENT.fullmatch(traceparent):
        raise ValueError(
            "trace['traceparent']: expected W3C '00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>' "
            f"(ids not all zero), got {traceparent!r}"
        )
    return tuple((key, trace[key]) for key in TRACE_KEYS if trace.get(key))


@dataclass(frozen=True)
class CallOptions:
    """What one call sends besides its request: its timeout and metadata."""

    timeout: float
    metadata: Metadata


class _Calls:
    """The deadline and metadata shared by the blocking and the asyncio clients."""

    def __init__(self, timeout_s: float, security: ClientSecurity | None) -> None:
        self.timeout_s = _positive(timeout_s)
        self._security = security or ClientSecurity()

    def call(self, timeout_s: float | None, trace: Mapping[str, str] | None) -> CallOptions:
        """This call's deadline (`timeout_s`, else the client's) and its token and trace context metadata."""
        timeout = self.timeout_s if timeout_s is None else _positive(timeout_s)
        return CallOptions(timeout, (*self._security.metadata(), *trace_metadata(trace)))


def _positive(timeout_s: float) -> float:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s: expected a positive number of seconds, got {timeout_s}")
    return timeout_s


class Client(_Calls):
    """A blocking channel to one service at `address` (host:port); a context manager closing it."""

    def __init__(
        self,
        address: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        security: ClientSecurity | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(timeout_s, security)
        self.channel: grpc.Channel = self._security.channel(address, options)

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class AsyncClient(_Calls):
    """A grpc.aio channel to one service at `address` (host:port), to use inside a running event loop; an async
    context manager closing it."""

    def __init__(
        self,
        address: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        security: ClientSecurity | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(timeout_s, security)
        self.channel: aio.Channel = self._security.aio_channel(address, options)

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()
