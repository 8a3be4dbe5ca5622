"""The sibling workers of a multi-process predictor, reached over unix sockets, so that repository
calls (load, unload) reach every worker and statistics cover all of them. A call made on a caller's
behalf carries the caller's own bearer token, which each sibling verifies again."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grpc import aio

from chassis.auth import forwarded_metadata
from chassis.errors import FrescoError, InvalidArgument, Unavailable
from chassis.status import STATUS_FOR_ERROR
from fresco.api.inference import grpc_service_pb2 as pb
from fresco.api.inference import grpc_service_pb2_grpc as pb_grpc
from predictor.worker_plan import socket_path

# Metadata marking a call one worker forwards to the others, so it is not forwarded again.
FORWARDED = "x-fresco-forwarded-by"
# Metadata marking a repository call routed to the leading worker, which coordinates it.
ROUTED = "x-fresco-routed-by"
PEER_TIMEOUT_S = 300.0
# RepositoryIndex states of a model a restarted worker loads as its sibling does.
_SERVED_OR_COMING = {"READY", "LOADING"}
_ERROR_FOR_STATUS: dict[Any, type[FrescoError]] = {code: error for error, code in STATUS_FOR_ERROR.items()}


def forwarded(metadata: Any) -> bool:
    """Whether a call came from a sibling worker."""
    return any(key == FORWARDED for key, _ in metadata or ())


def routed(metadata: Any) -> bool:
    """Whether a sibling routed this call here for this worker to coordinate."""
    return any(key == ROUTED for key, _ in metadata or ())


def _index(path: Path) -> int:
    return int(path.stem.removeprefix("worker-"))


class Peers:
    """Calls to every other worker of this predictor."""

    def __init__(self, peers_dir: Path, index: int, channel_factory: Callable[[str], aio.Channel]) -> None:
        self.peers_dir = peers_dir
        self.index = index
        self._channel_factory = channel_factory
        self._stubs: dict[Path, pb_grpc.GRPCInferenceServiceAsyncStub] = {}
        self._channels: list[aio.Channel] = []

    def _others(self) -> list[Path]:
        mine = socket_path(self.peers_dir, self.index)
        return sorted((p for p in self.peers_dir.glob("worker-*.sock") if p != mine), key=_index)

    def leader(self) -> Path | None:
        """The socket of the lowest-numbered worker serving, or None when that is this one."""
        others = self._others()
        return others[0] if others and _index(others[0]) < self.index else None

    async def route(self, leader: Path, method: str, request: Any) -> Any:
        """Hand a repository call to the leading worker, which coordinates it for every worker."""
        try:
            return await getattr(self._stub(leader), method)(
                request, metadata=((ROUTED, str(self.index)), *forwarded_metadata()), timeout=PEER_TIMEOUT_S
            )
        except aio.AioRpcError as err:
            # The leader's answer, with its code, is the caller's answer.
            error = _ERROR_FOR_STATUS.get(err.code(), Unavailable)
            raise error(err.details() or f"the leading worker answered {err.code().name}") from None

    async def outcomes(self, method: str, request: Any) -> list[tuple[str, Any]]:
        """Call `method` on every other worker: each worker's name and its answer or its error."""
        paths = self._others()
        metadata = ((FORWARDED, str(self.index)), *forwarded_metadata())
        calls = [
            getattr(self._stub(path), method)(request, metadata=metadata, timeout=PEER_TIMEOUT_S) for path in paths
        ]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        return [(path.stem, answer) for path, answer in zip(paths, answers, strict=True)]

    def _stub(self, path: Path) -> pb_grpc.GRPCInferenceServiceAsyncStub:
        stub = self._stubs.get(path)
        if stub is None:
            channel = self._channel_factory(f"unix:{path}")
            self._channels.append(channel)
            stub = self._stubs[path] = pb_grpc.GRPCInferenceServiceStub(channel)
        return stub

    async def broadcast(self, method: str, request: Any) -> list[Any]:
        """Call `method` on every other worker; their answers, or a domain error naming the worker."""
        paths = self._others()
        metadata = ((FORWARDED, str(self.index)), *forwarded_metadata())
        calls = [
            getattr(self._stub(path), method)(request, metadata=metadata, timeout=PEER_TIMEOUT_S) for path in paths
        ]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        failures = [
            (path, answer) for path, answer in zip(paths, answers, strict=True) if isinstance(answer, Exception)
        ]
        if failures:
            path, error = failures[0]
            details = error.details() if isinstance(error, aio.AioRpcError) else str(error)
            raise InvalidArgument(f"{method} failed on worker {path.stem}: {details}")
        return answers

    async def served_models(self) -> list[str] | None:
        """The models the first answering sibling serves or is loading; None when none answers.

        Loading ones count: a sibling still loading its start-up models serves none of them yet, and
        a worker restarted then must load them too, not nothing."""
        for path in self._others():
            try:
                index = await self._stub(path).RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
            except aio.AioRpcError:
                continue
            return sorted({model.name for model in index.models if model.state in _SERVED_OR_COMING})
        return None

    async def close(self) -> None:
        """Close the sibling channels."""
        for channel in self._channels:
            await channel.close()


def merge_statistics(responses: list[pb.ModelStatisticsResponse]) -> pb.ModelStatisticsResponse:
    """Sum per-version statistics of several workers into one answer."""
    merged: dict[tuple[str, str], pb.ModelStatistics] = {}
    for response in responses:
        for stats in response.model_stats:
            key = (stats.name, stats.version)
            into = merged.get(key)
            if into is None:
                merged[key] = pb.ModelStatistics()
                merged[key].CopyFrom(stats)
                continue
            into.last_inference = max(into.last_inference, stats.last_inference)
            into.inference_count += stats.inference_count
            into.execution_count += stats.execution_count
            for phase in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
                _add(getattr(into.inference_stats, phase), getattr(stats.inference_stats, phase))
            sizes = {batch.batch_size: batch for batch in into.batch_stats}
            for batch in stats.batch_stats:
                target = sizes.get(batch.batch_size)
                if target is None:
                    into.batch_stats.add().CopyFrom(batch)
                    continue
                for phase in ("compute_input", "compute_infer", "compute_output"):
                    _add(getattr(target, phase), getattr(batch, phase))
            into.memory_usage.extend(stats.memory_usage)
    return pb.ModelStatisticsResponse(model_stats=[merged[key] for key in sorted(merged)])


def _add(into: pb.StatisticDuration, other: pb.StatisticDuration) -> None:
    into.count += other.count
    into.ns += other.ns
