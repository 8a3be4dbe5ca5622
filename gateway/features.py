"""Fetching the features a model needs for the entities of a request from the feature service:
one GetFeatures call for every entity and feature of the request, whatever their number, each
value read together with its status."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from grpc import aio

from chassis.errors import FailedPrecondition, Unavailable
from chassis.status import peer_error
from fresco.api.common.v1 import values_pb2
from fresco.api.features.v1 import feature_service_pb2 as fpb
from fresco.api.features.v1 import feature_service_pb2_grpc as fpb_grpc
from gateway.assembly import FeatureValue, from_proto
from gateway.budget import Budget

# Statuses under which the feature service served no value because the feature's null policy
# (the one training used) had none to give: the model cannot be fed honestly.
_NO_VALUE: dict[int, str] = {
    fpb.FEATURE_STATUS_NULL: "its stored value is null",
    fpb.FEATURE_STATUS_NOT_FOUND: "nothing is stored for it",
    fpb.FEATURE_STATUS_EXPIRED: "its stored value is older than the view's TTL",
    fpb.FEATURE_STATUS_REJECTED: "its value is missing",
}


def _status_name(status: int) -> str:
    try:
        return fpb.FeatureStatus.Name(fpb.FeatureStatus.ValueType(status))
    except ValueError:
        return f"status {status}"


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


def describe_entity(key: values_pb2.EntityKey) -> str:
    """An entity key as people read it: `user_id=7, driver_id=3`."""
    return ", ".join(f"{name}={from_proto(key.join_keys[name])!r}" for name in sorted(key.join_keys))


@dataclass(frozen=True)
class Served:
    """One feature value as the feature service served it."""

    value: FeatureValue
    status: int


@dataclass(frozen=True)
class Fetched:
    """A GetFeatures answer: for each entity, each ref's served value; and whether the service
    answered from a fallback tier."""

    rows: list[dict[str, Served]]
    degraded: bool


def usable(ref: str, served: Served, entity: values_pb2.EntityKey, label: str) -> tuple[FeatureValue, bool]:
    """The value to feed the model for one fetched feature, and whether it was imputed.

    UNAVAILABLE is the store's failure, not the caller's; a value the null policy could not supply
    is FAILED_PRECONDITION naming the entity and the feature."""
    status = served.status
    if status == fpb.FEATURE_STATUS_UNAVAILABLE:
        view = ref.split(":", 1)[0]
        raise Unavailable(
            f"{label}: feature view {view!r} is unavailable: the feature service could not read its online store"
        )
    if status == fpb.FEATURE_STATUS_IMPUTED and served.value is not None:
        return served.value, True
    if status in (fpb.FEATURE_STATUS_PRESENT, fpb.FEATURE_STATUS_UNSPECIFIED) and served.value is not None:
        return served.value, False
    reason = _NO_VALUE.get(status, "no value was served")
    policy = "rejects missing values" if status == fpb.FEATURE_STATUS_REJECTED else "imputes none"
    raise FailedPrecondition(
        f"{label}: entity {describe_entity(entity)} has no value for feature {ref!r}: {reason} "
        f"({_status_name(status)}) and the feature's null policy {policy}"
    )


def usable_values(
    refs: Sequence[str], served: Mapping[str, Served], entity: values_pb2.EntityKey, label: str
) -> tuple[dict[str, FeatureValue], list[str]]:
    """The values of `refs` for one query and those of them that were imputed; an unavailable view
    is reported before any missing value, since it is the likelier cause."""
    absent = Served(None, fpb.FEATURE_STATUS_UNSPECIFIED)
    ordered = sorted(refs, key=lambda ref: served.get(ref, absent).status != fpb.FEATURE_STATUS_UNAVAILABLE)
    values: dict[str, FeatureValue] = {}
    imputed: list[str] = []
    for ref in ordered:
        values[ref], was_imputed = usable(ref, served.get(ref, absent), entity, label)
        if was_imputed:
            imputed.append(ref)
    return values, sorted(imputed)


class FeatureClient:
    """GetFeatures calls to one feature service."""

    def __init__(self, channel_factory: Callable[[str], aio.Channel], address: str, timeout_s: float) -> None:
        self.address = address
        self._channel = channel_factory(address)
        self._stub = fpb_grpc.FeatureServiceStub(self._channel)
        self._timeout_s = timeout_s

    async def fetch(self, entities: Sequence[values_pb2.EntityKey], refs: Sequence[str], budget: Budget) -> Fetched:
        """For each entity, its served value and status of each feature ref (imputed by the
        feature service under each feature's null policy)."""
        what = f"feature service {self.address}"
        request = fpb.GetFeaturesRequest(entity_keys=entities, feature_refs=refs)
        timeout = budget.for_hop(f"{what} GetFeatures", self._timeout_s)
        try:
            response = await self._stub.GetFeatures(request, timeout=timeout)
        except aio.AioRpcError as err:
            raise peer_error(err.code(), err.details() or "", what) from None
        rows: list[dict[str, Served]] = [{} for _ in entities]
        for column in response.columns:
            statuses = list(column.statuses) or [fpb.FEATURE_STATUS_UNSPECIFIED] * len(column.values)
            if len(column.values) != len(entities) or len(statuses) != len(entities):
                raise Unavailable(
                    f"{what}: column {column.feature_ref!r} holds {len(column.values)} values and "
                    f"{len(statuses)} statuses for {len(entities)} entities"
                )
            for row, value, status in zip(rows, column.values, statuses, strict=True):
                row[column.feature_ref] = Served(from_proto(value), status)
        return Fetched(rows, response.metadata.degraded)

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()


def needed_refs(feature_names: Sequence[str], supplied: Mapping[str, FeatureValue]) -> list[str]:
    """The feature-service refs ("view:feature") a model needs that the caller did not supply."""
    return [name for name in feature_names if ":" in name and name not in supplied]
