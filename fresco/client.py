"""Fresco's Python client: Python values in, numpy arrays out, blocking or asyncio, e.g.
`outputs(GatewayClient(address).predict("demo", {"f0": 0.3, "f1": -1.2}))["probabilities"]`.

- `GatewayClient` / `AsyncGatewayClient`: `predict`, `predict_batch` (the gateway's Predict and PredictBatch);
- `FeatureClient` / `AsyncFeatureClient`: `get_features` (the feature service's GetFeatures);
- `ExperimentClient` / `AsyncExperimentClient`: `assign` (the experiment service's Assign).

Every call takes `timeout_s` (its deadline; the client's `timeout_s` by default) and `trace` (the caller's W3C
trace context, see `fresco.calls`); the bearer token and TLS come from the client's `ClientSecurity`. Errors are
the services' `grpc.RpcError`s, status and details unchanged. Needs only grpcio, protobuf and numpy."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property

import numpy as np

from fresco.api.common.v1 import values_pb2
from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_service_pb2 as xpb
from fresco.api.experiments.v1 import experiment_service_pb2_grpc as xpb_grpc
from fresco.api.features.v1 import feature_service_pb2 as fpb
from fresco.api.features.v1 import feature_service_pb2_grpc as fpb_grpc
from fresco.api.gateway.v1 import gateway_pb2 as pb
from fresco.api.gateway.v1 import gateway_pb2_grpc as pb_grpc
from fresco.calls import AsyncClient, Client

Scalar = float | int | bool | str | bytes | np.generic
FeatureInput = Scalar | Sequence[float] | Sequence[int] | Sequence[str] | np.ndarray | None
# What a `fresco.common.v1.Value` holds, as plain Python.
PlainValue = float | int | bool | str | bytes | list[float] | list[int] | list[str] | None
Trace = Mapping[str, str] | None

# Datatypes a Tensor carries in int64_values; the other numeric ones travel as doubles.
_INT64_CARRIED = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32"})
_LIST_KINDS = frozenset({"double_list", "int64_list", "string_list"})


# --- values --------------------------------------------------------------------------------------


def to_value(value: FeatureInput) -> values_pb2.Value:
    """A Python or numpy value as a `fresco.common.v1.Value`; None is null."""
    if value is None:
        return values_pb2.Value()
    if isinstance(value, np.generic):
        value = value.item()
    # bool before int: bool is an int subclass but the gateway treats it as its own kind.
    if isinstance(value, bool):
        return values_pb2.Value(bool_value=value)
    if isinstance(value, int):
        return values_pb2.Value(int64_value=value)
    if isinstance(value, float):
        return values_pb2.Value(double_value=value)
    if isinstance(value, str):
        return values_pb2.Value(string_value=value)
    if isinstance(value, bytes):
        return values_pb2.Value(bytes_value=value)
    return _list_value(np.asarray(value))


def _list_value(array: np.ndarray) -> values_pb2.Value:
    if array.ndim != 1:
        raise TypeError(f"expected a scalar or a flat list, got shape {array.shape}")
    if array.dtype.kind in "USO":
        return values_pb2.Value(string_list=values_pb2.StringList(values=[str(v) for v in array.tolist()]))
    if array.dtype.kind in "biu":
        return values_pb2.Value(int64_list=values_pb2.Int64List(values=array.astype(np.int64).tolist()))
    return values_pb2.Value(double_list=values_pb2.DoubleList(values=array.astype(np.float64).tolist()))


def from_value(value: values_pb2.Value) -> PlainValue:
    """The Python value a `fresco.common.v1.Value` carries: None for null, a list for the list kinds."""
    kind = value.WhichOneof("kind")
    if kind is None:
        return None
    if kind in _LIST_KINDS:
        return list(getattr(value, kind).values)
    result: PlainValue = getattr(value, kind)
    return result


def entity_key(join_keys: Mapping[str, FeatureInput]) -> values_pb2.EntityKey:
    """An entity by its join keys' values, e.g. `entity_key({"user_id": 42})`."""
    return values_pb2.EntityKey(join_keys={name: to_value(value) for name, value in join_keys.items()})


def to_array(tensor: values_pb2.Tensor) -> np.ndarray:
    """A `fresco.common.v1.Tensor` as a numpy array of its shape."""
    if tensor.datatype == "BYTES":
        flat: np.ndarray = np.array(list(tensor.bytes_values), dtype=object)
    elif tensor.datatype == "BOOL":
        flat = np.array(tensor.bool_values, dtype=np.bool_)
    elif tensor.datatype == "UINT64":
        flat = np.array(tensor.uint64_values, dtype=np.uint64)
    elif tensor.datatype in _INT64_CARRIED:
        flat = np.array(tensor.int64_values, dtype=np.int64)
    else:
        flat = np.array(tensor.double_values, dtype=np.float64)
    return flat.reshape(tuple(tensor.shape))


# --- the gateway ---------------------------------------------------------------------------------


def predict_request(
    model: str,
    features: Mapping[str, FeatureInput],
    version: str = "",
    request_id: str = "",
    unit_ids: Mapping[str, str] | None = None,
    attributes: Mapping[str, FeatureInput] | None = None,
    entity_keys: Iterable[Mapping[str, FeatureInput]] = (),
    output_names: Iterable[str] = (),
) -> pb.PredictRequest:
    """A PredictRequest for one row of named features; `unit_ids` (by unit type) and `attributes` place it in the
    gateway's experiments, `entity_keys` name entities whose stored features the gateway fetches, `output_names`
    restrict the answer."""
    return pb.PredictRequest(
        model=model,
        version=version,
        features={name: to_value(value) for name, value in features.items()},
        request_id=request_id,
        unit_ids=dict(unit_ids or {}),
        attributes={name: to_value(value) for name, value in (attributes or {}).items()},
        entity_keys=[entity_key(keys) for keys in entity_keys],
        outputs=list(output_names),
    )


def outputs(response: pb.PredictResponse) -> dict[str, np.ndarray]:
    """Every output of an answer as a numpy array."""
    return {name: to_array(tensor) for name, tensor in response.outputs.items()}


class GatewayClient(Client):
    """Blocking calls to a gateway at `address` (host:port), over TLS and with a bearer token when
    `security` says so (e.g. `ClientSecurity.from_env()`)."""

    @cached_property
    def _stub(self) -> pb_grpc.GatewayServiceStub:
        return pb_grpc.GatewayServiceStub(self.channel)

    def predict(
        self,
        model: str,
        features: Mapping[str, FeatureInput],
        version: str = "",
        request_id: str = "",
        *,
        unit_ids: Mapping[str, str] | None = None,
        attributes: Mapping[str, FeatureInput] | None = None,
        entity_keys: Iterable[Mapping[str, FeatureInput]] = (),
        output_names: Iterable[str] = (),
        timeout_s: float | None = None,
        trace: Trace = None,
    ) -> pb.PredictResponse:
        """One prediction from named features (and the stored features of `entity_keys`), see `predict_request`."""
        request = predict_request(model, features, version, request_id, unit_ids, attributes, entity_keys, output_names)
        return self.send(request, timeout_s, trace)

    def send(
        self, request: pb.PredictRequest, timeout_s: float | None = None, trace: Trace = None
    ) -> pb.PredictResponse:
        """Send a PredictRequest built beforehand."""
        call = self.call(timeout_s, trace)
        return self._stub.Predict(request, timeout=call.timeout, metadata=call.metadata)

    def predict_batch(
        self, requests: Iterable[pb.PredictRequest], *, timeout_s: float | None = None, trace: Trace = None
    ) -> pb.PredictBatchResponse:
        """Many predictions in one call (requests built with `predict_request`), answered in request order."""
        call = self.call(timeout_s, trace)
        batch = pb.PredictBatchRequest(requests=list(requests))
        return self._stub.PredictBatch(batch, timeout=call.timeout, metadata=call.metadata)


class AsyncGatewayClient(AsyncClient):
    """grpc.aio calls to a gateway at `address` (host:port); use inside a running event loop. TLS and
    the bearer token as `security` says."""

    @cached_property
    def _stub(self) -> pb_grpc.GatewayServiceAsyncStub:
        return pb_grpc.GatewayServiceStub(self.channel)

    async def predict(
        self,
        model: str,
        features: Mapping[str, FeatureInput],
        version: str = "",
        request_id: str = "",
        *,
        unit_ids: Mapping[str, str] | None = None,
        attributes: Mapping[str, FeatureInput] | None = None,
        entity_keys: Iterable[Mapping[str, FeatureInput]] = (),
        output_names: Iterable[str] = (),
        timeout_s: float | None = None,
        trace: Trace = None,
    ) -> pb.PredictResponse:
        """One prediction from named features (and the stored features of `entity_keys`), see `predict_request`."""
        request = predict_request(model, features, version, request_id, unit_ids, attributes, entity_keys, output_names)
        return await self.send(request, timeout_s, trace)

    async def send(
        self, request: pb.PredictRequest, timeout_s: float | None = None, trace: Trace = None
    ) -> pb.PredictResponse:
        """Send a PredictRequest built beforehand (e.g. to keep building it out of a latency measurement)."""
        call = self.call(timeout_s, trace)
        return await self._stub.Predict(request, timeout=call.timeout, metadata=call.metadata)

    async def predict_batch(
        self, requests: Iterable[pb.PredictRequest], *, timeout_s: float | None = None, trace: Trace = None
    ) -> pb.PredictBatchResponse:
        """Many predictions in one call (requests built with `predict_request`), answered in request order."""
        call = self.call(timeout_s, trace)
        batch = pb.PredictBatchRequest(requests=list(requests))
        return await self._stub.PredictBatch(batch, timeout=call.timeout, metadata=call.metadata)


# --- the feature service -------------------------------------------------------------------------


def features_request(
    entities: Iterable[Mapping[str, FeatureInput]],
    feature_refs: Iterable[str],
    include_event_timestamps: bool = False,
    max_staleness_s: float | None = None,
) -> fpb.GetFeaturesRequest:
    """A GetFeaturesRequest for `feature_refs` ("view:feature") of entities given by their join keys;
    `max_staleness_s` replaces each view's TTL for this call."""
    request = fpb.GetFeaturesRequest(
        entity_keys=[entity_key(keys) for keys in entities],
        feature_refs=list(feature_refs),
        include_event_timestamps=include_event_timestamps,
    )
    if max_staleness_s is not None:
        if not max_staleness_s >= 0:
            raise ValueError(f"max_staleness_s: expected a non-negative number of seconds, got {max_staleness_s}")
        request.max_staleness.FromNanoseconds(round(max_staleness_s * 1e9))
    return request


def feature_columns(response: fpb.GetFeaturesResponse) -> dict[str, list[PlainValue]]:
    """Each feature ref's values, one per requested entity in request order (None where none was served)."""
    return {column.feature_ref: [from_value(value) for value in column.values] for column in response.columns}


class FeatureClient(Client):
    """Blocking calls to a feature service at `address` (host:port)."""

    @cached_property
    def _stub(self) -> fpb_grpc.FeatureServiceStub:
        return fpb_grpc.FeatureServiceStub(self.channel)

    def get_features(
        self,
        entities: Iterable[Mapping[str, FeatureInput]],
        feature_refs: Iterable[str],
        *,
        include_event_timestamps: bool = False,
        max_staleness_s: float | None = None,
        timeout_s: float | None = None,
        trace: Trace = None,
    ) -> fpb.GetFeaturesResponse:
        """The online values of `feature_refs` ("view:feature") for entities given by their join keys, e.g.
        `[{"user_id": 42}]`; `feature_columns` decodes them. See `features_request`."""
        call = self.call(timeout_s, trace)
        request = features_request(entities, feature_refs, include_event_timestamps, max_staleness_s)
        return self._stub.GetFeatures(request, timeout=call.timeout, metadata=call.metadata)


class AsyncFeatureClient(AsyncClient):
    """grpc.aio calls to a feature service at `address` (host:port)."""

    @cached_property
    def _stub(self) -> fpb_grpc.FeatureServiceAsyncStub:
        return fpb_grpc.FeatureServiceStub(self.channel)

    async def get_features(
        self,
        entities: Iterable[Mapping[str, FeatureInput]],
        feature_refs: Iterable[str],
        *,
        include_event_timestamps: bool = False,
        max_staleness_s: float | None = None,
        timeout_s: float | None = None,
        trace: Trace = None,
    ) -> fpb.GetFeaturesResponse:
        """The online values of `feature_refs` ("view:feature") for entities given by their join keys, e.g.
        `[{"user_id": 42}]`; `feature_columns` decodes them. See `features_request`."""
        call = self.call(timeout_s, trace)
        request = features_request(entities, feature_refs, include_event_timestamps, max_staleness_s)
        return await self._stub.GetFeatures(request, timeout=call.timeout, metadata=call.metadata)


# --- the experiment service ----------------------------------------------------------------------

Unit = Mapping[str, str] | apb.AssignmentUnit


def assignment_unit(
    unit_ids: Mapping[str, str], attributes: Mapping[str, FeatureInput] | None = None
) -> apb.AssignmentUnit:
    """A unit to assign: its ids by unit type (e.g. {"user_id": "42"}) and the attributes targeting tests."""
    return apb.AssignmentUnit(
        unit_ids=dict(unit_ids), attributes={name: to_value(value) for name, value in (attributes or {}).items()}
    )


def assign_request(
    units: Iterable[Unit], experiment_keys: Iterable[str] = (), model_name: str = ""
) -> xpb.AssignRequest:
    """An AssignRequest; a unit given as a mapping is its unit ids, without attributes."""
    return xpb.AssignRequest(
        units=[u if isinstance(u, apb.AssignmentUnit) else assignment_unit(u) for u in units],
        experiment_keys=list(experiment_keys),
        model_name=model_name,
    )


def arms(response: xpb.AssignResponse) -> list[dict[str, str]]:
    """Each unit's arm by experiment key, in request order, for the experiments the unit is assigned in."""
    assigned = apb.ASSIGNMENT_REASON_ASSIGNED
    return [{a.experiment_key: a.arm_name for a in unit.assignments if a.reason == assigned} for unit in response.units]


class ExperimentClient(Client):
    """Blocking calls to an experiment service at `address` (host:port)."""

    @cached_property
    def _stub(self) -> xpb_grpc.ExperimentServiceStub:
        return xpb_grpc.ExperimentServiceStub(self.channel)

    def assign(
        self,
        units: Iterable[Unit],
        experiment_keys: Iterable[str] = (),
        model_name: str = "",
        *,
        timeout_s: float | None = None,
        trace: Trace = None,
    ) -> xpb.AssignResponse:
        """The units' assignments in the running experiments (or only `experiment_keys`, or those on `model_name`);
        `arms` reads them."""
        call = self.call(timeout_s, trace)
        request = assign_request(units, experiment_keys, model_name)
        return self._stub.Assign(request, timeout=call.timeout, metadata=call.metadata)


class AsyncExperimentClient(AsyncClient):
    """grpc.aio calls to an experiment service at `address` (host:port)."""

    @cached_property
    def _stub(self) -> xpb_grpc.ExperimentServiceAsyncStub:
        return xpb_grpc.ExperimentServiceStub(self.channel)

    async def assign(
        self,
        units: Iterable[Unit],
        experiment_keys: Iterable[str] = (),
        model_name: str = "",
        *,
        timeout_s: float | None = None,
        trace: Trace = None,
    ) -> xpb.AssignResponse:
        """The units' assignments in the running experiments (or only `experiment_keys`, or those on `model_name`);
        `arms` reads them."""
        call = self.call(timeout_s, trace)
        request = assign_request(units, experiment_keys, model_name)
        return await self._stub.Assign(request, timeout=call.timeout, metadata=call.metadata)
