"""LogExposures: a mixin of the servicer. Decode, hand the rows to the ingest, encode."""

from __future__ import annotations

from typing import Any, TypeAlias

from grpc import aio

from experiment_service.data_domain import DataHolder
from fresco.api.experiments.v1 import experiment_service_pb2 as pb

Context: TypeAlias = aio.ServicerContext[Any, Any]


class ExposureRpcs(DataHolder):
    """LogExposures, for the servicer's bases."""

    async def LogExposures(self, request: pb.LogExposuresRequest, context: Context) -> pb.LogExposuresResponse:
        return await self._data().ingest.log_exposures(request.exposures)
