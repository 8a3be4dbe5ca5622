"""LogExposures: a mixin of the servicer. Decode, hand the rows to the ingest, encode."""

from __future__ import annotations

from typing import Any, TypeAlias

from grpc import aio

from experiment_service.data_domain import DataHolder
from experiment_service.exposure_metrics import ExposureMetrics
from fresco.api.experiments.v1 import experiment_service_pb2 as pb

Context: TypeAlias = aio.ServicerContext[Any, Any]


class ExposureRpcs(DataHolder):
    """LogExposures, for the servicer's bases."""

    exposure_metrics: ExposureMetrics | None = None

    async def LogExposures(self, request: pb.LogExposuresRequest, context: Context) -> pb.LogExposuresResponse:
        answer = await self._data().ingest.log_exposures(request.exposures)
        if self.exposure_metrics is not None:
            self.exposure_metrics.observe(request.exposures, answer)
        return answer
