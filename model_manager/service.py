"""The registry RPCs of ModelManagerService: decode, call the registry in a worker thread, encode.

The rollout, deployment and metrics RPCs live in `rollout_rpcs.RolloutRpcs`, a base of the servicer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeAlias

from grpc import aio

from chassis.auth import Role, method_roles
from chassis.errors import InvalidArgument, Unavailable
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as pb_grpc
from model_manager import messages, schema
from model_manager.callers import caller_identity
from model_manager.fleet import Fleet
from model_manager.fleet_rpcs import FleetRpcs
from model_manager.gate_rpcs import GateRpcs
from model_manager.hold_rpcs import HoldRpcs
from model_manager.label_rpcs import LabelRpcs
from model_manager.model_rpcs import ModelRpcs
from model_manager.monitor_rpcs import MonitorRpcs
from model_manager.optimize_rpcs import OptimizeRpcs
from model_manager.registry import Registry
from model_manager.rollout_rpcs import RolloutRpcs
from model_manager.route_rpcs import RouteRpcs
from model_manager.safety_rpcs import SafetyRpcs
from model_manager.uploads import VersionUploads

Context: TypeAlias = aio.ServicerContext[Any, Any]
# The role each method needs once auth is on: changing the registry or what is served is a deployer's
# (admin includes it); reading it needs none, or viewer with --auth-require-for-reads.
METHOD_ROLES = method_roles(
    pb.DESCRIPTOR.services_by_name["ModelManagerService"],
    writes={
        name: Role.DEPLOYER
        for name in (
            "CreateModel", "UpdateModel", "UploadModelVersion", "SetModelAlias", "DeleteModelAlias",
            "PromoteModelVersion", "DeployModelVersion", "PauseRollout", "ResumeRollout", "AbortRollout",
            "PromoteRollout", "RetryRollout", "UndoRollout", "ApplyDeployment", "ReportMetrics", "RegisterPredictor",
            "PredictorHeartbeat", "HoldVersions", "LogLabels", "OptimizeModelVersion",
        )
    },
    reads=[
        "GetModel", "ListModels", "GetModelVersion", "ListModelVersions", "ListAuditRecords",
        "GetRolloutStatus", "ListRollouts", "WatchRollout", "WatchRoutes", "GetOperation", "WatchOperation",
        "GetDeployment", "ListDeployments", "ListPredictors", "GetModelMonitor", "GetPredictionQuality",
        "GetSafetyScore",
    ],
)  # fmt: skip


@dataclass(frozen=True)
class Domain:
    """What the servicer runs on once the database is reachable and its tables exist."""

    registry: Registry
    uploads: VersionUploads
    fleet: Fleet | None = None


async def _chunks(requests: AsyncIterator[pb.UploadModelVersionRequest]) -> AsyncIterator[bytes]:
    async for request in requests:
        kind = request.WhichOneof("payload")
        if kind == "metadata":
            raise InvalidArgument("metadata: sent again; expected only chunks after the first message")
        if kind is None:
            raise InvalidArgument("payload: expected metadata or a chunk, got an empty message")
        yield request.chunk


class ModelManagerServicer(
    HoldRpcs,
    ModelRpcs,
    FleetRpcs,
    GateRpcs,
    RouteRpcs,
    RolloutRpcs,
    MonitorRpcs,
    LabelRpcs,
    SafetyRpcs,
    OptimizeRpcs,
    pb_grpc.ModelManagerServiceServicer,
):
    """fresco.models.v1.ModelManagerService: the registry's RPCs here; the fleet's, the promotion gates', the route
    stream's and the rollouts' in the mixins."""

    def __init__(self) -> None:
        self.domain: Domain | None = None

    def _domain(self) -> Domain:
        if self.domain is None:
            raise Unavailable("model manager is starting: the registry database is not reachable or migrated yet")
        return self.domain

    async def CreateModel(self, request: pb.CreateModelRequest, context: Context) -> pb.CreateModelResponse:
        registry = self._domain().registry
        spec = messages.model_spec(request.model)
        record = await asyncio.to_thread(registry.create_model, spec, caller_identity(context), request.reason)
        return pb.CreateModelResponse(model=messages.model_message(record))

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.GetModelResponse:
        record = await asyncio.to_thread(self._domain().registry.get_model, request.name)
        return pb.GetModelResponse(model=messages.model_message(record))

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        registry = self._domain().registry
        page = await asyncio.to_thread(
            registry.list_models, request.page_size, request.page_token, request.owner, dict(request.label_selector)
        )
        return pb.ListModelsResponse(
            models=[messages.model_message(m) for m in page.items], next_page_token=page.next_page_token
        )

    async def UploadModelVersion(
        self, request_iterator: AsyncIterator[pb.UploadModelVersionRequest], context: Context
    ) -> pb.UploadModelVersionResponse:
        uploads = self._domain().uploads
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "metadata":
            got = "an empty stream" if first is None else "a chunk"
            raise InvalidArgument(f"metadata: expected the first message to carry the metadata, got {got}")
        spec = messages.version_spec(first.metadata)
        record = await uploads.upload(spec, _chunks(request_iterator), caller_identity(context), first.metadata.reason)
        return pb.UploadModelVersionResponse(model_version=messages.version_message(record), sha256_verified=True)

    async def GetModelVersion(self, request: pb.GetModelVersionRequest, context: Context) -> pb.GetModelVersionResponse:
        registry = self._domain().registry
        selector = request.WhichOneof("selector")
        stage = messages.stage_of("stage", request.stage) if selector == "stage" else None
        if selector == "version":
            schema.version_number("version", request.version)  # 0 would mean "the latest" to the registry
        if selector == "alias" and not request.alias:
            raise InvalidArgument("alias: expected an alias name, got an empty one")
        record = await asyncio.to_thread(
            registry.get_version, request.model_name, request.version, stage, request.alias
        )
        return pb.GetModelVersionResponse(model_version=messages.version_message(record))

    async def ListModelVersions(
        self, request: pb.ListModelVersionsRequest, context: Context
    ) -> pb.ListModelVersionsResponse:
        registry = self._domain().registry
        stages = [messages.stage_of("stages", value) for value in request.stages]
        page = await asyncio.to_thread(
            registry.list_versions, request.model_name, stages, request.page_size, request.page_token
        )
        return pb.ListModelVersionsResponse(
            model_versions=[messages.version_message(v) for v in page.items], next_page_token=page.next_page_token
        )

    async def SetModelAlias(self, request: pb.SetModelAliasRequest, context: Context) -> pb.SetModelAliasResponse:
        registry = self._domain().registry
        model, previous = await asyncio.to_thread(
            registry.set_alias,
            request.model_name,
            request.alias,
            request.version,
            caller_identity(context),
            request.reason,
        )
        return pb.SetModelAliasResponse(model=messages.model_message(model), previous_version=previous)

    async def DeleteModelAlias(
        self, request: pb.DeleteModelAliasRequest, context: Context
    ) -> pb.DeleteModelAliasResponse:
        registry = self._domain().registry
        model, previous = await asyncio.to_thread(
            registry.delete_alias, request.model_name, request.alias, caller_identity(context), request.reason
        )
        return pb.DeleteModelAliasResponse(model=messages.model_message(model), previous_version=previous)

    async def ListAuditRecords(
        self, request: pb.ListAuditRecordsRequest, context: Context
    ) -> pb.ListAuditRecordsResponse:
        registry = self._domain().registry
        page = await asyncio.to_thread(registry.list_audit, request.model_name, request.page_size, request.page_token)
        return pb.ListAuditRecordsResponse(
            records=[messages.audit_message(e) for e in page.items], next_page_token=page.next_page_token
        )
