"""Repository calls over the workers of `--workers N`, so that all of them end up serving the same
versions. The lowest-numbered worker coordinates every load: it prepares the new versions (loaded and
warm) on itself and on each sibling, then commits them everywhere only if every worker prepared them,
and otherwise aborts everywhere, so all keep the old versions or all report the failure."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from chassis.errors import FailedPrecondition, InvalidArgument
from fresco.api.inference import grpc_service_pb2 as pb
from predictor.models import Model, ModelStore, Prepared, State
from predictor.overrides import INTERNAL_PREFIX, parse_load_parameters
from predictor.peers import PEER_TIMEOUT_S, Peers, forwarded, routed

log = logging.getLogger(__name__)
Result = TypeVar("Result")

PHASE = f"{INTERNAL_PREFIX}phase"
LOAD_ID = f"{INTERNAL_PREFIX}load"
REASON = f"{INTERNAL_PREFIX}reason"


@dataclass
class _Pending:
    prepared: Prepared
    expiry: asyncio.Task[None]


def _with(request: pb.RepositoryModelLoadRequest, **values: str) -> pb.RepositoryModelLoadRequest:
    phased = pb.RepositoryModelLoadRequest()
    phased.CopyFrom(request)
    for key, value in values.items():
        phased.parameters[f"{INTERNAL_PREFIX}{key}"].string_param = value
    return phased


def _internal(parameters: Mapping[str, pb.ModelRepositoryParameter], key: str) -> str:
    value = parameters.get(key)
    return value.string_param if value is not None else ""


class Coordinator:
    """Loads and unloads on this worker, and on its siblings when it has any."""

    def __init__(self, store: ModelStore, peers: Peers | None) -> None:
        self.store = store
        self.peers = peers
        self._pending: dict[str, _Pending] = {}

    async def load(self, request: pb.RepositoryModelLoadRequest, metadata: Any) -> None:
        """RepositoryModelLoad: returns once the model serves on every worker, or raises why not."""
        if self.peers is not None and forwarded(metadata):
            await self._phase(request)
            return
        override = parse_load_parameters(request.model_name, request.parameters)
        if self.peers is None:
            model = await _finish(self.store.load(request.model_name, override))
            _raise_unless_ready(request.model_name, model)
            return
        leader = self.peers.leader()
        if leader is not None and not routed(metadata):
            await self.peers.route(leader, "RepositoryModelLoad", request)
            return
        await _finish(self._coordinate(self.peers, request))

    async def unload(self, request: pb.RepositoryModelUnloadRequest, metadata: Any) -> None:
        """RepositoryModelUnload on this worker and every sibling."""
        local = self.store.unload(request.model_name)
        if self.peers is not None and not forwarded(metadata):
            await asyncio.gather(local, self.peers.broadcast("RepositoryModelUnload", request))
        else:
            await local

    async def _coordinate(self, peers: Peers, request: pb.RepositoryModelLoadRequest) -> None:
        name = request.model_name
        override = parse_load_parameters(name, request.parameters)
        load_id = uuid.uuid4().hex
        async with self.store.locks.hold(name):
            prepared = await self.store.prepare(name, override)
            outcomes = await peers.outcomes("RepositoryModelLoad", _with(request, phase="prepare", load=load_id))
            failures = [f"{worker}: {_details(answer)}" for worker, answer in outcomes if isinstance(answer, Exception)]
            if prepared.model.state is not State.READY:
                failures.insert(0, f"worker-{peers.index}: {prepared.model.reason}")
            if not failures:
                await self.store.commit(prepared)
                decided = await peers.outcomes("RepositoryModelLoad", _with(request, phase="commit", load=load_id))
                _log_failures(name, "commit", decided)
                return
            reason = "; ".join(failures)
            await self.store.abort(prepared, reason)
            decided = await peers.outcomes(
                "RepositoryModelLoad", _with(request, phase="abort", load=load_id, reason=reason)
            )
            _log_failures(name, "abort", decided)
        raise InvalidArgument(f"model {name!r} failed to load: {reason}")

    async def _phase(self, request: pb.RepositoryModelLoadRequest) -> None:
        """A step of a load the leading worker coordinates."""
        phase, load_id = _internal(request.parameters, PHASE), _internal(request.parameters, LOAD_ID)
        name = request.model_name
        if phase == "prepare":
            override = parse_load_parameters(name, request.parameters)
            await self.store.locks.acquire(name)  # held until commit or abort
            try:
                prepared = await self.store.prepare(name, override)
            except BaseException:
                self.store.locks.release(name)
                raise
            expiry = asyncio.get_running_loop().create_task(self._expire(load_id))
            self._pending[load_id] = _Pending(prepared, expiry)
            if prepared.model.state is not State.READY:
                raise FailedPrecondition(prepared.model.reason)
            return
        pending = self._pending.pop(load_id, None)
        if pending is None:
            if phase == "abort":
                return  # its prepare failed before anything was held
            raise FailedPrecondition(f"load {load_id} of model {name!r} is not prepared on this worker")
        pending.expiry.cancel()
        try:
            if phase == "commit":
                await self.store.commit(pending.prepared)
            else:
                await self.store.abort(pending.prepared, _internal(request.parameters, REASON))
        finally:
            self.store.locks.release(name)

    async def _expire(self, load_id: str) -> None:
        """A load whose coordinator never decided (it died) is aborted, keeping what served before."""
        await asyncio.sleep(PEER_TIMEOUT_S)
        pending = self._pending.pop(load_id, None)
        if pending is not None:
            name = pending.prepared.model.name
            try:
                await self.store.abort(pending.prepared, "the coordinating worker never decided the load")
            finally:
                self.store.locks.release(name)


async def _finish(work: Coroutine[Any, Any, Result]) -> Result:
    """Run a load to its end even when the caller goes away: stopping half-way would leave versions
    loaded but never served, or siblings holding a prepared load until it expires."""
    task = asyncio.ensure_future(work)
    task.add_done_callback(_log_orphaned_failure)
    return await asyncio.shield(task)


def _log_orphaned_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        log.info("load finished with: %s", error)  # also raised to the caller, when it is still there


def _details(error: BaseException) -> str:
    details = getattr(error, "details", None)
    return str(details()) if callable(details) else str(error)


def _log_failures(name: str, phase: str, outcomes: list[tuple[str, Any]]) -> None:
    for worker, answer in outcomes:
        if isinstance(answer, Exception):
            log.error("model %s: %s failed on %s: %s", name, phase, worker, _details(answer))


def _raise_unless_ready(name: str, model: Model) -> None:
    if model.state is not State.READY:
        raise InvalidArgument(f"model {name!r} failed to load: {model.reason}")
