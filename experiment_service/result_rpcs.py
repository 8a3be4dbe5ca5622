"""GetResults and GetResultsHistory: a mixin of the servicer over the results domain."""

from __future__ import annotations

from typing import Any, TypeAlias

from grpc import aio

from experiment_service.data_domain import DataHolder
from fresco.api.experiments.v1 import experiment_service_pb2 as pb

Context: TypeAlias = aio.ServicerContext[Any, Any]


class ResultRpcs(DataHolder):
    """GetResults, GetResultsHistory, for the servicer's bases."""

    async def GetResults(self, request: pb.GetResultsRequest, context: Context) -> pb.GetResultsResponse:
        return pb.GetResultsResponse(results=await self._data().results.results(request.key, request.phase))

    async def GetResultsHistory(
        self, request: pb.GetResultsHistoryRequest, context: Context
    ) -> pb.GetResultsHistoryResponse:
        return await self._data().results.history(request.key, request.phase, request.metric)
