"""The rollout, deployment and metrics RPCs of ModelManagerService: decode, call the rollout domain, encode."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
from grpc import aio

from chassis.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import rollout_pb2 as rpb
from model_manager import schema
from model_manager.callers import caller_identity
from model_manager.controller import Entry, RolloutController
from model_manager.deployments import Deployments, GenerationMismatch
from model_manager.reconcile import Outcome
from model_manager.rollout_messages import event_messages, rollout_message, rollout_spec, state_of
from model_manager.rollout_verbs import RolloutVerbs
from model_manager.xds import AdsService
from model_manager.xds_stream import Nack

Context: TypeAlias = aio.ServicerContext[Any, Any]
MAX_PAGE_SIZE = 1000
ROUTE_TABLE_TYPE = "type.googleapis.com/fresco.models.v1.RouteTable"


@dataclass(frozen=True)
class RolloutRuntime:
    """What the rollout RPCs run on: the controller, its verbs and the declared deployments."""

    controller: RolloutController
    verbs: RolloutVerbs
    deployments: Deployments
    ads: AdsService | None = None

    @classmethod
    def of(cls, controller: RolloutController, ads: AdsService | None = None) -> RolloutRuntime:
        verbs = RolloutVerbs(controller)
        return cls(controller, verbs, Deployments(verbs), ads)


def _identity(context: Context) -> str:
    return caller_identity(context)


def _page_size(value: int) -> int:
    if not 0 <= value <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size: expected 0 (the default) to {MAX_PAGE_SIZE}, got {value}")
    return value


class RolloutRpcs:
    """Rollouts (deploy, status, list, watch, verbs), deployments (apply, get, list) and ReportMetrics."""

    rollouts: RolloutRuntime | None = None

    def _runtime(self) -> RolloutRuntime:
        if self.rollouts is None:
            raise Unavailable("model manager is starting: the rollout runtime is not ready yet")
        return self.rollouts

    def _message(self, entry: Entry) -> rpb.Rollout:
        runtime = self._runtime()
        r = entry.rollout
        nacks: list[Nack] = []
        if runtime.ads is not None:
            created = r.to_dict()["created_at"]
            nacks = [n for n in runtime.ads.nacks() if n.at >= created]
        hub = runtime.controller.hub
        if hub is not None:
            for gateway, revision, error in reversed(hub.rejections(r.spec.model)):
                nacks.append(Nack(gateway, ROUTE_TABLE_TYPE, str(revision), "", error, 0.0))
        return rollout_message(
            r, entry.revision, initiated_by=entry.initiated_by, reason=entry.reason, labels=entry.labels, nacks=nacks
        )

    async def DeployModelVersion(
        self, request: pb.DeployModelVersionRequest, context: Context
    ) -> pb.DeployModelVersionResponse:
        verbs = self._runtime().verbs
        schema.model_name("model_name", request.model_name)
        schema.version_number("version", request.version)
        baseline = await verbs.baseline(request.model_name, request.version)
        auto = request.auto_rollback if request.HasField("auto_rollback") else None
        spec = rollout_spec("strategy", request.model_name, request.version, baseline, request.strategy, auto)
        applied, entry = await verbs.deploy(
            spec,
            identity=_identity(context),
            reason=request.reason,
            labels=dict(request.labels),
            supersede=request.supersede_active,
        )
        if applied.outcome is Outcome.HELD:
            raise FailedPrecondition(f"version: {applied.message}")
        return pb.DeployModelVersionResponse(rollout=self._message(entry))

    async def GetRolloutStatus(
        self, request: pb.GetRolloutStatusRequest, context: Context
    ) -> pb.GetRolloutStatusResponse:
        entry = await self._runtime().verbs.find(request.rollout_id, request.model_name)
        return pb.GetRolloutStatusResponse(rollout=self._message(entry))

    async def ListRollouts(self, request: pb.ListRolloutsRequest, context: Context) -> pb.ListRolloutsResponse:
        runtime = self._runtime()
        if request.model_name:
            schema.model_name("model_name", request.model_name)
        states = [state_of("states", s).value for s in request.states]
        page = await asyncio.to_thread(
            runtime.controller.store.page,
            request.model_name,
            states,
            _page_size(request.page_size),
            request.page_token,
        )
        clock = runtime.controller.clock
        return pb.ListRolloutsResponse(
            rollouts=[self._message(Entry.of(s, clock)) for s in page.items], next_page_token=page.next_page_token
        )

    async def _act(self, rollout_id: str, verb: str, reason: str, context: Context, full: bool = False) -> rpb.Rollout:
        entry = await self._runtime().verbs.act(rollout_id, verb, _identity(context), reason, full=full)
        return self._message(entry)

    async def PauseRollout(self, request: pb.PauseRolloutRequest, context: Context) -> pb.PauseRolloutResponse:
        return pb.PauseRolloutResponse(rollout=await self._act(request.rollout_id, "pause", request.reason, context))

    async def ResumeRollout(self, request: pb.ResumeRolloutRequest, context: Context) -> pb.ResumeRolloutResponse:
        rollout = await self._act(request.rollout_id, "resume", request.reason, context, request.promote_full)
        return pb.ResumeRolloutResponse(rollout=rollout)

    async def AbortRollout(self, request: pb.AbortRolloutRequest, context: Context) -> pb.AbortRolloutResponse:
        return pb.AbortRolloutResponse(rollout=await self._act(request.rollout_id, "abort", request.reason, context))

    async def PromoteRollout(self, request: pb.PromoteRolloutRequest, context: Context) -> pb.PromoteRolloutResponse:
        rollout = await self._act(request.rollout_id, "promote", request.reason, context, request.full)
        return pb.PromoteRolloutResponse(rollout=rollout)

    async def RetryRollout(self, request: pb.RetryRolloutRequest, context: Context) -> pb.RetryRolloutResponse:
        return pb.RetryRolloutResponse(rollout=await self._act(request.rollout_id, "retry", request.reason, context))

    async def UndoRollout(self, request: pb.UndoRolloutRequest, context: Context) -> pb.UndoRolloutResponse:
        return pb.UndoRolloutResponse(rollout=await self._act(request.rollout_id, "undo", request.reason, context))

    async def WatchRollout(
        self, request: pb.WatchRolloutRequest, context: Context
    ) -> AsyncIterator[pb.WatchRolloutResponse]:
        """The rollout's status now (or, resuming, its first change after that revision), then every change; each
        message's new_events are only the events stored after the revision the watcher last saw."""
        runtime = self._runtime()
        verbs, controller = runtime.verbs, runtime.controller
        if request.resume_after_revision < 0:
            raise InvalidArgument("resume_after_revision: expected 0 or a revision the watch sent")
        entry = await verbs.find(request.rollout_id, request.model_name)
        rollout_id = entry.rollout.rollout_id
        sent_revision = request.resume_after_revision
        sent_events = entry.events_at(sent_revision)  # the events the watcher already has
        while True:
            changed = controller.changed(rollout_id)  # taken before reading, so no change falls in between
            entry = await verbs.find(rollout_id)
            if entry.revision > sent_revision:
                events = event_messages(entry.rollout, sent_events)
                sent_revision, sent_events = entry.revision, len(entry.rollout.events)
                yield pb.WatchRolloutResponse(rollout=self._message(entry), revision=entry.revision, new_events=events)
            await changed.wait()

    async def ApplyDeployment(self, request: pb.ApplyDeploymentRequest, context: Context) -> pb.ApplyDeploymentResponse:
        runtime = self._runtime()
        try:
            result = await runtime.deployments.apply(request, _identity(context))
        except GenerationMismatch as err:
            await context.abort(grpc.StatusCode.ABORTED, str(err))
            raise AssertionError("unreachable") from err  # abort raises
        response = pb.ApplyDeploymentResponse(
            deployment=result.deployment, outcome=result.outcome, message=result.message, changes=result.changes
        )
        if result.rollout is not None:
            response.rollout.CopyFrom(self._message(result.rollout))
        return response

    async def GetDeployment(self, request: pb.GetDeploymentRequest, context: Context) -> pb.GetDeploymentResponse:
        runtime = self._runtime()
        schema.model_name("model_name", request.model_name)
        stored = await asyncio.to_thread(runtime.controller.store.deployment, request.model_name)
        if stored is None:
            raise NotFound(f"model_name: {request.model_name!r} has no deployment")
        return pb.GetDeploymentResponse(deployment=runtime.deployments.message(stored))

    async def ListDeployments(self, request: pb.ListDeploymentsRequest, context: Context) -> pb.ListDeploymentsResponse:
        runtime = self._runtime()
        page = await asyncio.to_thread(
            runtime.controller.store.deployments_page, _page_size(request.page_size), request.page_token
        )
        return pb.ListDeploymentsResponse(
            deployments=[runtime.deployments.message(d) for d in page.items], next_page_token=page.next_page_token
        )

    async def ReportMetrics(self, request: pb.ReportMetricsRequest, context: Context) -> pb.ReportMetricsResponse:
        if not request.gateway_id:
            raise InvalidArgument("gateway_id: expected the reporting gateway's id")
        reported = await self._runtime().verbs.report(request.gateway_id, request.windows)
        return pb.ReportMetricsResponse(
            accepted_windows=reported.accepted, duplicate_windows=reported.duplicates, rejected=reported.rejected
        )
