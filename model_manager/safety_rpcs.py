"""GetSafetyScore: a model family's safety score with its four parts (a mixin of the servicer)."""

from __future__ import annotations

import asyncio
from typing import Any, TypeAlias

from grpc import aio

from chassis.errors import Unavailable
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from model_manager import schema
from model_manager.safety_sources import SafetySources

Context: TypeAlias = aio.ServicerContext[Any, Any]


class SafetyRpcs:
    """GetSafetyScore, over the sources the server wires once the registry is reachable."""

    safety: SafetySources | None = None

    async def GetSafetyScore(self, request: pb.GetSafetyScoreRequest, context: Context) -> pb.GetSafetyScoreResponse:
        schema.model_name("model_name", request.model_name)
        if self.safety is None:
            raise Unavailable("model manager is starting: the registry database is not reachable or migrated yet")
        answer = await asyncio.to_thread(self.safety.score, request.model_name)
        return pb.GetSafetyScoreResponse(safety_score=answer)
