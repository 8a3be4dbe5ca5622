"""The one table that maps domain errors to gRPC status codes."""

from __future__ import annotations

import grpc

from chassis import errors

STATUS_FOR_ERROR: dict[type[errors.FrescoError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


def status_for(exc: errors.FrescoError) -> grpc.StatusCode:
    """The status code of a domain error, by its nearest class in the table."""
    for cls in type(exc).__mro__:
        code = STATUS_FOR_ERROR.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


# A peer's status as this service's caller sees it: the caller's own mistakes, missing things,
# deadlines and backpressure keep their code; anything else is the peer being unavailable.
ERROR_FOR_PEER_STATUS: dict[grpc.StatusCode, type[errors.FrescoError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
}


def peer_error(code: grpc.StatusCode, details: str, peer: str) -> errors.FrescoError:
    """The domain error to raise when a call to `peer` (e.g. "predictor host:port") failed with `code`."""
    kind = ERROR_FOR_PEER_STATUS.get(code, errors.Unavailable)
    return kind(f"{peer}: {details}")
