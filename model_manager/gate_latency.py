"""The latency gate: the candidate's warm p99, timed with ModelInfer against a predictor where it is loaded.

The predictor comes from the fleet (see PredictorFleet); without a fleet the gate reports an error, never a pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from grpc import aio

from chassis.errors import FrescoError
from fresco.api.inference import grpc_service_pb2 as ipb
from fresco.api.inference import grpc_service_pb2_grpc as ipb_grpc
from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager.backtest import NUMPY_TYPES
from model_manager.gate_results import check, error
from model_manager.routes import Endpoint

LATENCY = rpb.GATE_TYPE_LATENCY
# Timed inputs are the same on every run, so two measurements of one version send the same bytes.
INPUT_SEED = 20240601
REQUEST_TIMEOUT_S = 30.0


class PredictorFleet(Protocol):
    """What the latency gate needs of the fleet (model_manager.fleet.Fleet): a predictor with the version warm."""

    async def ensure_loaded(self, model: str, version: int, *, replicas: int = 1) -> tuple[Endpoint, ...]:
        """Load and warm the version on `replicas` predictors; the endpoints where it is warm."""
        ...

    def predictor_model_name(self, model: str, version: int) -> str:
        """The model name to send in ModelInfer to those endpoints."""
        ...

    async def release(self, model: str, version: int) -> None:
        """Unload the version from every predictor and stop placing it."""
        ...


ChannelFactory = Callable[[str], aio.Channel]


@dataclass(frozen=True)
class LatencySample:
    """Timed requests: how many, and their p50 and p99 in milliseconds."""

    requests: int
    p50_ms: float
    p99_ms: float


def infer_request(
    signature: rpb.ModelSignature, model_name: str, version: str, batch_size: int
) -> ipb.ModelInferRequest:
    """A request of `batch_size` rows for every input of the signature, with seeded values."""
    rng = np.random.default_rng(INPUT_SEED)
    request = ipb.ModelInferRequest(model_name=model_name, model_version=version)
    for spec in signature.inputs:
        shape = [batch_size if axis == 0 and d < 0 else max(d, 1) for axis, d in enumerate(spec.shape)] or [batch_size]
        tensor = ipb.ModelInferRequest.InferInputTensor(name=spec.name, datatype=spec.datatype, shape=shape)
        request.inputs.append(tensor)
        count = int(np.prod(shape))
        if spec.datatype == "BYTES":
            element = b"x"
            request.raw_input_contents.append((len(element).to_bytes(4, "little") + element) * count)
            continue
        dtype = NUMPY_TYPES.get(spec.datatype)
        if dtype is None:
            raise ValueError(f"input {spec.name!r}: cannot make {spec.datatype} values")
        values = rng.standard_normal(count) if np.issubdtype(dtype, np.floating) else rng.integers(0, 2, count)
        request.raw_input_contents.append(values.astype(dtype).tobytes())
    return request


async def measure_latency(
    channels: ChannelFactory, address: str, request: ipb.ModelInferRequest, samples: int, warmup: int
) -> LatencySample:
    """Send `warmup` untimed requests, then time `samples` requests one after another; p50 and p99 in ms."""
    async with channels(address) as channel:
        stub = ipb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(warmup):
            await stub.ModelInfer(request, timeout=REQUEST_TIMEOUT_S)
        timings = np.empty(samples)
        for i in range(samples):
            start = time.perf_counter()
            await stub.ModelInfer(request, timeout=REQUEST_TIMEOUT_S)
            timings[i] = (time.perf_counter() - start) * 1000.0
    p50, p99 = np.percentile(timings, [50, 99], method="higher")
    return LatencySample(samples, float(p50), float(p99))


async def latency_gate(
    gate: rpb.LatencyGate,
    model: str,
    version: int,
    signature: rpb.ModelSignature,
    fleet: PredictorFleet | None,
    channels: ChannelFactory,
    default_samples: int,
    default_warmup: int,
) -> rpb.GateResult:
    """Load the version through the fleet, time it on the first warm predictor and compare p99 with the budget."""
    name = "latency.p99"
    if fleet is None:
        return error(name, LATENCY, "no predictor fleet to measure on")
    try:
        endpoints = await fleet.ensure_loaded(model, version, replicas=1)
        if not endpoints:
            return error(name, LATENCY, f"the fleet has no predictor where {model} v{version} is warm")
        endpoint = endpoints[0]
        address = f"[{endpoint.host}]:{endpoint.port}" if ":" in endpoint.host else f"{endpoint.host}:{endpoint.port}"
        batch = gate.batch_size or 1
        request = infer_request(signature, fleet.predictor_model_name(model, version), str(version), batch)
        sample = await measure_latency(
            channels, address, request, gate.sample_requests or default_samples, gate.warmup_requests or default_warmup
        )
    except FrescoError as err:
        return error(name, LATENCY, f"cannot load {model} v{version} on a predictor: {err}")
    except aio.AioRpcError as err:
        return error(name, LATENCY, f"ModelInfer failed: {err.code().name} {err.details()}")
    except ValueError as err:
        return error(name, LATENCY, str(err))
    ok = sample.p99_ms <= gate.p99_budget_ms
    detail = (
        f"p99 {sample.p99_ms:.2f} ms {'<=' if ok else '>'} budget {gate.p99_budget_ms:g} ms "
        f"(p50 {sample.p50_ms:.2f} ms, {sample.requests} requests of {batch} rows on {address})"
    )
    return check(name, LATENCY, ok, detail, sample.p99_ms, gate.p99_budget_ms)
