"""A small typed client for the gateway: Python values in, numpy arrays out, e.g.
`outputs(GatewayClient(address).predict("demo", {"f0": 0.3, "f1": -1.2}))["probabilities"]`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Self

import grpc
import numpy as np
from grpc import aio

from fresco.api.common.v1 import values_pb2
from fresco.api.gateway.v1 import gateway_pb2 as pb
from fresco.api.gateway.v1 import gateway_pb2_grpc as pb_grpc
from fresco.credentials import ClientSecurity

Scalar = float | int | bool | str | bytes | np.generic
FeatureInput = Scalar | Sequence[float] | Sequence[int] | Sequence[str] | np.ndarray | None

# Gateway answers are small; anything slower than this is an outage, not a slow model.
DEFAULT_TIMEOUT_S = 10.0
# Datatypes a Tensor carries in int64_values; the other numeric ones travel as doubles.
_INT64_CARRIED = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32"})


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


def predict_request(
    model: str,
    features: Mapping[str, FeatureInput],
    version: str = "",
    request_id: str = "",
    unit_ids: Mapping[str, str] | None = None,
    attributes: Mapping[str, FeatureInput] | None = None,
) -> pb.PredictRequest:
    """A PredictRequest for one row of named features; `unit_ids` (by unit type) and `attributes` place it in the
    gateway's experiments."""
    return pb.PredictRequest(
        model=model,
        version=version,
        features={name: to_value(value) for name, value in features.items()},
        request_id=request_id,
        unit_ids=dict(unit_ids or {}),
        attributes={name: to_value(value) for name, value in (attributes or {}).items()},
    )


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


def outputs(response: pb.PredictResponse) -> dict[str, np.ndarray]:
    """Every output of an answer as a numpy array."""
    return {name: to_array(tensor) for name, tensor in response.outputs.items()}


class GatewayClient:
    """Blocking calls to a gateway at `address` (host:port), over TLS and with a bearer token when
    `security` says so (e.g. `ClientSecurity.from_env()`)."""

    def __init__(
        self, address: str, timeout_s: float = DEFAULT_TIMEOUT_S, security: ClientSecurity | None = None
    ) -> None:
        self.timeout_s = timeout_s
        self._security = security or ClientSecurity()
        self._channel: grpc.Channel = self._security.channel(address)
        self._stub = pb_grpc.GatewayServiceStub(self._channel)

    def predict(self, model: str, features: Mapping[str, FeatureInput], version: str = "") -> pb.PredictResponse:
        """One prediction from named features."""
        return self._stub.Predict(
            predict_request(model, features, version), timeout=self.timeout_s, metadata=self._security.metadata()
        )

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class AsyncGatewayClient:
    """grpc.aio calls to a gateway at `address` (host:port); use inside a running event loop. TLS and
    the bearer token as `security` says."""

    def __init__(
        self, address: str, timeout_s: float = DEFAULT_TIMEOUT_S, security: ClientSecurity | None = None
    ) -> None:
        self.timeout_s = timeout_s
        self._channel: aio.Channel = (security or ClientSecurity()).aio_channel(address)
        self._stub = pb_grpc.GatewayServiceStub(self._channel)

    async def predict(
        self, model: str, features: Mapping[str, FeatureInput], version: str = "", request_id: str = ""
    ) -> pb.PredictResponse:
        """One prediction from named features."""
        return await self.send(predict_request(model, features, version, request_id))

    async def send(self, request: pb.PredictRequest) -> pb.PredictResponse:
        """Send a request built beforehand (e.g. to keep building it out of a latency measurement)."""
        return await self._stub.Predict(request, timeout=self.timeout_s)

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
