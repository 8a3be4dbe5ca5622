"""OptimizeModelVersion (a mixin of the servicer): decode, run the optimizer, encode."""

from __future__ import annotations

from chassis.errors import Unavailable
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from model_manager import messages
from model_manager.callers import Context, caller_identity
from model_manager.optimizer import Optimizer, OptimizeRequest


class OptimizeRpcs:
    """Mixin of ModelManagerServicer: optimised versions judged by the model's accuracy budget."""

    optimizer: Optimizer | None = None

    async def OptimizeModelVersion(
        self, request: pb.OptimizeModelVersionRequest, context: Context
    ) -> pb.OptimizeModelVersionResponse:
        if self.optimizer is None:
            raise Unavailable("model manager is starting: optimisation is not ready yet")
        optimized = await self.optimizer.optimize(
            OptimizeRequest(
                model_name=request.model_name,
                version=request.version,
                method=request.method,
                calibration_uri=request.calibration_uri,
                calibration_rows=request.calibration_rows,
                dry_run=request.dry_run,
                reason=request.reason,
            ),
            caller_identity(context),
        )
        response = pb.OptimizeModelVersionResponse(report=optimized.report)
        if optimized.version is not None:
            response.model_version.CopyFrom(messages.version_message(optimized.version))
        return response
