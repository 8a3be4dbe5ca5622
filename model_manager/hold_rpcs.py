"""HoldVersions: keep versions of a model warm and routable at weight 0 for a holder, such as an experiment whose
arms pin requests to them (a mixin of the servicer)."""

from __future__ import annotations

import asyncio
from typing import Any, TypeAlias

from grpc import aio

from chassis.errors import Unavailable
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from model_manager.callers import caller_identity

Context: TypeAlias = aio.ServicerContext[Any, Any]


class HoldRpcs:
    """HoldVersions, over the controller's hold store; the routes are rebuilt at once."""

    async def HoldVersions(self, request: pb.HoldVersionsRequest, context: Context) -> pb.HoldVersionsResponse:
        runtime = getattr(self, "rollouts", None)
        if runtime is None or runtime.controller.holds is None:
            raise Unavailable("model manager is starting: the rollout controller is not running yet")
        holds = runtime.controller.holds
        current = await asyncio.to_thread(
            holds.set, request.model_name, request.holder, list(request.versions), caller_identity(context),
            request.reason,
        )  # fmt: skip
        runtime.controller.wake()  # held versions are loaded and routed by the next table
        return pb.HoldVersionsResponse(holds=current)
