"""LogOutcomes: a mixin of the servicer. Every batch is answered on the stream once its accepted rows are durably
recorded, so a client that loses the stream resends exactly the batches it has no answer for."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

from grpc import aio

from chassis.errors import Unavailable
from experiment_service.data_domain import DataHolder
from fresco.api.experiments.v1 import experiment_service_pb2 as pb

Context: TypeAlias = aio.ServicerContext[Any, Any]


class OutcomeRpcs(DataHolder):
    """LogOutcomes, for the servicer's bases."""

    async def LogOutcomes(
        self, request_iterator: AsyncIterator[pb.LogOutcomesRequest], context: Context
    ) -> AsyncIterator[pb.LogOutcomesResponse]:
        data = self._data()
        requests = aiter(request_iterator)
        while (batch := await data.next_request(requests)) is not None:
            # A bad row is refused inside its batch's answer; only an unreachable store ends the stream (UNAVAILABLE),
            # leaving that batch unanswered for the client to resend.
            yield await data.ingest.log_outcomes(batch)
        if data.stopping.is_set():
            raise Unavailable("experiment service is stopping: reconnect and resend the batches not answered")
