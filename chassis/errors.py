"""Domain errors. Domain code raises these; `chassis.status` maps them to gRPC codes in one table.

Messages name the field and what was expected, because callers read them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class FrescoError(Exception):
    """Base of every error a Fresco service reports to its callers."""


class InvalidArgument(FrescoError):
    """The request is malformed: a field is missing, of the wrong type, shape or range."""


class NotFound(FrescoError):
    """A named thing (a model, a version, a feature view) does not exist."""


class AlreadyExists(FrescoError):
    """The thing being created exists already."""


class FailedPrecondition(FrescoError):
    """The system is not in a state where the request can be served (e.g. not configured)."""


class Aborted(FrescoError):
    """A concurrent change won: the expected version is stale; read again and retry."""


class Unavailable(FrescoError):
    """A dependency or the requested model is not ready now (loading, warming, down); retry later."""


class ResourceExhausted(FrescoError):
    """A queue or quota is full; the caller should back off."""


class DeadlineExceeded(FrescoError):
    """The request's deadline passed before the work could be done."""


class Unauthenticated(FrescoError):
    """No credentials, or credentials that could not be verified."""


class PermissionDenied(FrescoError):
    """Valid credentials that do not allow this request."""


def invalid_config(source: str, err: ValidationError) -> InvalidArgument:
    """A configuration file's validation errors as one message naming the file and each field."""
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in err.errors(include_url=False)
    )
    return InvalidArgument(f"{source}: {problems}")
