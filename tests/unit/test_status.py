"""The one table from domain errors to gRPC status codes."""

from __future__ import annotations

import grpc
import pytest

from chassis import errors
from chassis.status import STATUS_FOR_ERROR, status_for

EXPECTED = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Aborted, grpc.StatusCode.ABORTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
]


@pytest.mark.parametrize(("error", "code"), EXPECTED, ids=[e.__name__ for e, _ in EXPECTED])
def test_each_domain_error_maps_to_its_code(error: type[errors.FrescoError], code: grpc.StatusCode) -> None:
    assert status_for(error("field x: expected y")) is code


def test_table_covers_every_domain_error_class() -> None:
    declared = {cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.FrescoError)}
    assert set(STATUS_FOR_ERROR) == declared - {errors.FrescoError}
    assert {code for _, code in EXPECTED} == set(STATUS_FOR_ERROR.values())


def test_subclass_maps_through_its_parent() -> None:
    class ModelWarming(errors.Unavailable):
        pass

    class BadShape(errors.InvalidArgument):
        pass

    class VeryBadShape(BadShape):
        pass

    assert status_for(ModelWarming("warming")) is grpc.StatusCode.UNAVAILABLE
    assert status_for(VeryBadShape("shape")) is grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_domain_error_is_internal() -> None:
    class Strange(errors.FrescoError):
        pass

    assert status_for(Strange("?")) is grpc.StatusCode.INTERNAL
    assert status_for(errors.FrescoError("bare base")) is grpc.StatusCode.INTERNAL
