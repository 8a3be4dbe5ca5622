"""Fetching the features a model needs for the entities of a request from the feature service:
one GetFeatures call for every entity and feature of the request, whatever their number."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from grpc import StatusCode, aio

from chassis.errors import DeadlineExceeded, FrescoError, InvalidArgument, NotFound, Unavailable
from fresco.api.common.v1 import values_pb2
from fresco.api.features.v1 import feature_service_pb2 as fpb
from fresco.api.features.v1 import feature_service_pb2_grpc as fpb_grpc
from gateway.assembly import FeatureValue, from_proto

_PASS_THROUGH: dict[StatusCode, type[FrescoError]] = {
    StatusCode.INVALID_ARGUMENT: InvalidArgument,
    StatusCode.NOT_FOUND: NotFound,
    StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def entity_identity(key: values_pb2.EntityKey) -> bytes:
    """A key that is equal for equal entity keys, to send each entity once."""
    return key.SerializeToString(deterministic=True)


def merge_entity_keys(keys: Sequence[values_pb2.EntityKey]) -> values_pb2.EntityKey:
    """One entity key holding every join key of a prediction's entities (user and driver, say)."""
    merged = values_pb2.EntityKey()
    for key in keys:
        for name, value in key.join_keys.items():
            merged.join_keys[name].CopyFrom(value)
    return merged


class FeatureClient:
    """GetFeatures calls to one feature service."""

    def __init__(self, channel_factory: Callable[[str], aio.Channel], address: str, timeout_s: float) -> None:
        self.address = address
        self._channel = channel_factory(address)
        self._stub = fpb_grpc.FeatureServiceStub(self._channel)
        self._timeout_s = timeout_s

    async def fetch(
        self, entities: Sequence[values_pb2.EntityKey], refs: Sequence[str], timeout_s: float | None
    ) -> list[dict[str, FeatureValue]]:
        """For each entity, its value of each feature ref (None where the service has none)."""
        request = fpb.GetFeaturesRequest(entity_keys=entities, feature_refs=refs)
        try:
            response = await self._stub.GetFeatures(request, timeout=timeout_s or self._timeout_s)
        except aio.AioRpcError as err:
            kind = _PASS_THROUGH.get(err.code(), Unavailable)
            raise kind(f"feature service {self.address}: {err.details()}") from None
        rows: list[dict[str, FeatureValue]] = [{} for _ in entities]
        for column in response.columns:
            for row, value in zip(rows, column.values, strict=False):
                row[column.feature_ref] = from_proto(value)
        return rows

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()


def needed_refs(feature_names: Sequence[str], supplied: Mapping[str, FeatureValue]) -> list[str]:
    """The feature-service refs ("view:feature") a model needs that the caller did not supply."""
    return [name for name in feature_names if ":" in name and name not in supplied]
