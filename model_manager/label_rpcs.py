"""LogLabels and GetPredictionQuality: a mixin of the servicer. Every label batch is answered on the stream once its
accepted labels are durable, so a client that loses the stream resends exactly the batches it has no answer for."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

from grpc import aio

from chassis.errors import InvalidArgument, Unavailable
from chassis.streams import next_or_stop
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from model_manager.quality_store import QualityStore

Context: TypeAlias = aio.ServicerContext[Any, Any]
MAX_BATCH = 10_000


class LabelRpcs:
    """LogLabels and GetPredictionQuality, for the servicer's bases."""

    quality: QualityStore | None = None

    def _quality(self) -> QualityStore:
        if self.quality is None:
            raise Unavailable("model manager is starting: the prediction store is not open yet")
        return self.quality

    async def LogLabels(
        self, request_iterator: AsyncIterator[pb.LogLabelsRequest], context: Context
    ) -> AsyncIterator[pb.LogLabelsResponse]:
        store = self._quality()
        requests = aiter(request_iterator)
        while (batch := await next_or_stop(requests, store.stopping)) is not None:
            if len(batch.labels) > MAX_BATCH:
                raise InvalidArgument(f"labels: expected at most {MAX_BATCH} labels per batch, got {len(batch.labels)}")
            # A bad label is refused inside its batch's answer; only an unreachable database ends the stream
            # (UNAVAILABLE), leaving that batch unanswered for the client to resend.
            yield await store.log_labels(batch)
        if store.stopping.is_set():
            raise Unavailable("model manager is stopping: reconnect and resend the label batches not answered")

    async def GetPredictionQuality(
        self, request: pb.GetPredictionQualityRequest, context: Context
    ) -> pb.GetPredictionQualityResponse:
        store = self._quality()
        return await asyncio.to_thread(store.answer, request.model_name, list(request.versions))
