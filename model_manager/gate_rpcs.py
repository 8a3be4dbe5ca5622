"""The promotion RPCs of ModelManagerService: PromoteModelVersion, GetOperation and WatchOperation."""

from __future__ import annotations

from collections.abc import AsyncIterator

from chassis.errors import Unavailable
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager import messages, schema
from model_manager.callers import Context, caller_identity
from model_manager.lifecycle import Stage
from model_manager.promotions import PromoteRequest, Promotions


class GateRpcs:
    """Mixin of ModelManagerServicer: promotions through the gates, as operations to read and watch."""

    promotions: Promotions | None = None

    def _promotions(self) -> Promotions:
        if self.promotions is None:
            raise Unavailable("model manager is starting: promotions are not ready yet")
        return self.promotions

    async def PromoteModelVersion(
        self, request: pb.PromoteModelVersionRequest, context: Context
    ) -> pb.PromoteModelVersionResponse:
        promotions = self._promotions()
        schema.model_name("model_name", request.model_name)
        schema.version_number("version", request.version)
        target = (
            Stage.CANDIDATE
            if request.target_stage == rpb.MODEL_STAGE_UNSPECIFIED
            else messages.stage_of("target_stage", request.target_stage)
        )
        promote = PromoteRequest(
            model_name=request.model_name,
            version=request.version,
            target=target,
            gates=request.gates if request.HasField("gates") else None,
            dry_run=request.dry_run,
            reason=request.reason,
            force=request.force,
        )
        operation = await promotions.start(promote, caller_identity(context))
        return pb.PromoteModelVersionResponse(operation=operation)

    async def GetOperation(self, request: pb.GetOperationRequest, context: Context) -> pb.GetOperationResponse:
        return pb.GetOperationResponse(operation=await self._promotions().get(request.operation_id))

    async def WatchOperation(
        self, request: pb.WatchOperationRequest, context: Context
    ) -> AsyncIterator[pb.WatchOperationResponse]:
        async for operation in self._promotions().watch(request.operation_id):
            yield pb.WatchOperationResponse(operation=operation)
