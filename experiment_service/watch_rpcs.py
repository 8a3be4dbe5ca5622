"""WatchExperiments, the assignment configuration stream to gateways: a mixin of the servicer over the
`ConfigHub`, streamed by `chassis.revision_stream` like the model manager's routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

from grpc import aio

from chassis import revision_stream
from chassis.errors import Unavailable
from chassis.revision_stream import RevisionStream
from experiment_service import config_hub
from experiment_service.domain import DomainHolder
from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_service_pb2 as pb

Context: TypeAlias = aio.ServicerContext[Any, Any]


class WatchRpcs(DomainHolder):
    """The WatchExperiments RPC, for the servicer's bases."""

    async def WatchExperiments(
        self, request_iterator: AsyncIterator[pb.WatchExperimentsRequest], context: Context
    ) -> AsyncIterator[pb.WatchExperimentsResponse]:
        """Stream the assignment configuration to one gateway and record its acknowledgements."""
        hub = self._domain().hub
        if hub.closed:
            raise Unavailable("experiment service is stopping: watch the configuration again from its next start")
        subscription: apb.ConfigSubscription = revision_stream.subscription(await anext(request_iterator, None))
        if subscription.resume_from_revision > hub.current.revision:
            await self._domain().catalog.catch_up(subscription.resume_from_revision)
        watcher = hub.connect(subscription.gateway_id, ())
        stream = RevisionStream(
            hub,
            watcher,
            subscription.resume_from_revision,
            config_hub.snapshot,
            config_hub.update,
            what="experiment configuration",
        )
        async for response in revision_stream.serve(stream, request_iterator):
            yield response
