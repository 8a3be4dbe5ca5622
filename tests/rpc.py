"""Helpers for tests that call real services over gRPC."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc


def outcome(call: Callable[[], Any]) -> grpc.StatusCode:
    """The status of a call; an error must come with a message."""
    try:
        call()
    except grpc.RpcError as err:
        code, details = err.code(), err.details()
    else:
        return grpc.StatusCode.OK
    assert details, f"{code} without a message"
    return code
