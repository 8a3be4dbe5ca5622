"""DecideExperiment: a mixin of the servicer over the decisions domain."""

from __future__ import annotations

from typing import Any, TypeAlias

from grpc import aio

from experiment_service.data_domain import DataHolder
from fresco.api.experiments.v1 import experiment_service_pb2 as pb
from model_manager.callers import caller_identity

Context: TypeAlias = aio.ServicerContext[Any, Any]


class DecisionRpcs(DataHolder):
    """DecideExperiment, for the servicer's bases."""

    async def DecideExperiment(
        self, request: pb.DecideExperimentRequest, context: Context
    ) -> pb.DecideExperimentResponse:
        decided, results = await self._data().decisions.decide(
            request.key, request.expected_version, request.action, request.arm, request.reason,
            caller_identity(context),
        )  # fmt: skip
        return pb.DecideExperimentResponse(experiment=decided, results=results)
