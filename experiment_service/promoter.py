"""The model manager as the decisions see it: PromoteModelVersion to production, through the manager's own gates
(nothing here can force them), called with the experiment service's control token."""

from __future__ import annotations

import grpc
from grpc import aio

from chassis.status import peer_error
from fresco.api.models.v1 import model_manager_service_pb2 as mpb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as mpb_grpc
from fresco.api.models.v1 import registry_pb2 as regpb


class ModelManagerPromoter:
    """Promoter over a channel to the model manager (carrying its token)."""

    def __init__(self, channel: aio.Channel, address: str, timeout_s: float = 10.0) -> None:
        self.channel = channel
        self.address = address
        self.timeout_s = timeout_s
        self._stub = mpb_grpc.ModelManagerServiceStub(channel)

    async def promote(self, model_name: str, version: int, reason: str) -> str:
        """Start the promotion of `version` to production; its operation id. The manager's refusal keeps its code
        (NOT_FOUND, FAILED_PRECONDITION, INVALID_ARGUMENT); anything else is UNAVAILABLE."""
        request = mpb.PromoteModelVersionRequest(
            model_name=model_name, version=version, target_stage=regpb.MODEL_STAGE_PRODUCTION, reason=reason
        )
        try:
            response = await self._stub.PromoteModelVersion(request, timeout=self.timeout_s)
        except aio.AioRpcError as err:
            code = err.code()
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                details = f"{err.details()} (check --model-manager-token-file: promoting needs a deployer's token)"
            else:
                details = err.details() or code.name
            raise peer_error(code, details, f"model manager {self.address}") from None
        return response.operation.operation_id

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()
