"""Fresco's side of the feature benchmark: the feature service started as a process on Redis and Cassandra,
loaded through its Materialize RPC, and read with GetFeatures from a grpc.aio client in this process."""

from __future__ import annotations

import gc
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpc import aio

from bench.features.data import JOIN_KEY, Dataset
from chassis.server import channel_options
from chassis.settings import DEFAULT_MAX_MESSAGE_BYTES
from feature_service.reader import Column, FeatureAnswer, answer_to_wire
from feature_service.service import FeatureServicer, method_handlers
from fresco.api.common.v1 import values_pb2 as vpb
from fresco.api.features.v1 import feature_service_pb2 as pb
from fresco.api.features.v1 import feature_service_pb2_grpc as pb_grpc
from fresco.suite import ServiceFailed, ServiceProcess

STARTUP_TIMEOUT_S = 180.0
CHUNK_ROWS = 1000
"""--materialize-chunk-rows: with the default 5000, a chunk is ~600 concurrent Cassandra batches, which a
cold node on two cores does not answer within the driver's 1.5 s timeout (Materialize fails UNAVAILABLE)."""


@dataclass
class Service:
    """One feature service process and how it was configured."""

    label: str
    flags: list[str]
    process: ServiceProcess
    startup_s: float = 0.0


def start_service(label: str, backend_flags: list[str], flags: list[str], log: Path) -> Service:
    """`python -m feature_service` on a free port, returned once its health check says SERVING (its bloom
    filters are built from Cassandra's keys by then)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    process = ServiceProcess("feature_service", ["--port", "0", *backend_flags, *flags], log_path=log)
    began = time.perf_counter()
    try:
        process.start(STARTUP_TIMEOUT_S)
        process.wait_healthy(STARTUP_TIMEOUT_S)
    except BaseException:
        process.stop()
        raise
    return Service(label, flags, process, time.perf_counter() - began)


def channel(address: str) -> aio.Channel:
    return aio.insecure_channel(address, options=channel_options(DEFAULT_MAX_MESSAGE_BYTES))


def entity_keys(ids: Sequence[int]) -> list[vpb.EntityKey]:
    return [vpb.EntityKey(join_keys={JOIN_KEY: vpb.Value(int64_value=i)}) for i in ids]


async def materialize(address: str, dataset: Dataset) -> dict[str, Any]:
    """Each view's Parquet file through the Materialize RPC (the service writes Cassandra, then Redis and its
    memory tier); the views one after the other. Rows written and seconds per view."""
    out: dict[str, Any] = {}
    async with channel(address) as chan:
        stub = pb_grpc.FeatureServiceStub(chan)
        for view, path in dataset.files.items():
            began = time.perf_counter()
            answer = await stub.Materialize(
                pb.MaterializeRequest(feature_view=view, source_uri=str(path.resolve())), timeout=900
            )
            seconds = time.perf_counter() - began
            out[view] = {"rows_written": answer.rows_written, "rows_rejected": answer.rows_rejected, "seconds": seconds}
            print(
                f"   {view}: {answer.rows_written:,} rows written, {answer.rows_rejected} rejected in {seconds:.1f}s",
                flush=True,
            )
            if answer.rows_written != dataset.entities or answer.rows_rejected:
                raise RuntimeError(
                    f"Materialize {view}: {answer.rows_written} rows written, expected {dataset.entities}"
                )
    return out


async def sample(address: str, refs: list[str], ids: list[int]) -> dict[str, list[Any]]:
    """One read's values by ref (None for null)."""
    async with channel(address) as chan:
        answer = await pb_grpc.FeatureServiceStub(chan).GetFeatures(
            pb.GetFeaturesRequest(entity_keys=entity_keys(ids), feature_refs=refs), timeout=30
        )
    values: dict[str, list[Any]] = {}
    for column in answer.columns:
        values[column.feature_ref] = [
            None if (kind := value.WhichOneof("kind")) is None else getattr(value, kind) for value in column.values
        ]
    return values


@dataclass
class Timed:
    """The latencies of one case on one system (its rounds added up), and what its answers said."""

    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    served_tiers: dict[str, int] = field(default_factory=dict)
    degraded: int = 0
    warmup_calls: int = 0
    gc_collections: list[int] = field(default_factory=list)  # per generation, during the timed calls
    detail: dict[str, Any] = field(default_factory=dict)  # e.g. the statuses of the last answer
    error: str = ""

    def add(self, part: Timed) -> None:
        """Take in another round."""
        self.latencies_ms += part.latencies_ms
        self.seconds += part.seconds
        for tier, count in part.served_tiers.items():
            self.served_tiers[tier] = self.served_tiers.get(tier, 0) + count
        self.degraded += part.degraded
        self.warmup_calls += part.warmup_calls
        mine, theirs = self.gc_collections, part.gc_collections
        self.gc_collections = [a + b for a, b in zip(mine, theirs, strict=True)] if mine else list(theirs)
        self.detail.update(part.detail)


def _collections() -> list[int]:
    return [generation["collections"] for generation in gc.get_stats()]


class Client:
    """A grpc.aio client keeping one channel per address, as a caller of the service would."""

    def __init__(self) -> None:
        self._channels: dict[str, aio.Channel] = {}

    def _stub(self, address: str) -> pb_grpc.FeatureServiceAsyncStub:
        chan = self._channels.get(address)
        if chan is None:
            chan = self._channels[address] = channel(address)
        return pb_grpc.FeatureServiceStub(chan)

    async def run(self, address: str, refs: list[str], warmup: list[list[int]], batches: list[list[int]]) -> Timed:
        """One unrecorded call per warm-up batch, then one GetFeatures per batch in order (concurrency 1), each
        timed alone. Requests are built beforehand, as Feast's entity rows are."""
        requests = [pb.GetFeaturesRequest(entity_keys=entity_keys(batch), feature_refs=refs) for batch in batches]
        call = self._stub(address).GetFeatures
        for batch in warmup:
            await call(pb.GetFeaturesRequest(entity_keys=entity_keys(batch), feature_refs=refs), timeout=30)
        result = Timed(warmup_calls=len(warmup))
        answers: list[pb.GetFeaturesResponse] = []
        latencies = result.latencies_ms
        clock = time.perf_counter
        collections = _collections()
        began = clock()
        for request in requests:
            start = clock()
            answer = await call(request, timeout=30)
            latencies.append((clock() - start) * 1000)
            answers.append(answer)
        result.seconds = clock() - began
        result.gc_collections = [after - before for after, before in zip(_collections(), collections, strict=True)]
        tiers: Counter[str] = Counter()
        for answer in answers:
            tiers["+".join(answer.metadata.served_tiers) or "none"] += 1
            result.degraded += answer.metadata.degraded
        result.served_tiers = dict(tiers)
        statuses: Counter[str] = Counter()
        for column in answers[-1].columns if answers else []:
            statuses.update(pb.FeatureStatus.Name(s).removeprefix("FEATURE_STATUS_") for s in column.statuses)
        result.detail["last_answer_statuses"] = dict(statuses)
        return result

    async def close(self) -> None:
        for chan in self._channels.values():
            await chan.close()
        self._channels.clear()


def serialised_once() -> bool:
    """Whether the service sends GetFeatures answers as the reader encodes them: the servicer answers with bytes
    and the handler the service registers sends those very bytes (tests/feature_service/test_reader.py checks the
    same, and that they parse to the answer)."""
    wire = answer_to_wire(FeatureAnswer([Column("v:f", "double", [1.5], [1], None, "memory")]))
    serialize = method_handlers(FeatureServicer())["GetFeatures"].response_serializer
    return serialize is not None and serialize(wire) is wire


def rpc_error(err: BaseException) -> str:
    """A one-line description of a failed call or start."""
    if isinstance(err, aio.AioRpcError):
        return f"{err.code().name}: {err.details()}"
    if isinstance(err, ServiceFailed):
        return str(err).splitlines()[0]
    return f"{type(err).__name__}: {err}"
