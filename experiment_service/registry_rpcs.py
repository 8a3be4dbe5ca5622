"""The registry RPCs of ExperimentService (create, read, list, update, start, stop, audit): a mixin of the servicer.
Decode, call the catalog, encode."""

from __future__ import annotations

from typing import Any, Final, TypeAlias

from grpc import aio

from chassis.errors import InvalidArgument
from experiment_service.domain import DomainHolder
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.api.experiments.v1 import experiment_service_pb2 as pb
from model_manager import pages
from model_manager.callers import caller_identity

Context: TypeAlias = aio.ServicerContext[Any, Any]
DEFAULT_PAGE: Final = 100
MAX_PAGE: Final = 1000
_PAGES: Final = "experiments"


class RegistryRpcs(DomainHolder):
    """CreateExperiment .. ListAuditEntries, for the servicer's bases."""

    async def CreateExperiment(
        self, request: pb.CreateExperimentRequest, context: Context
    ) -> pb.CreateExperimentResponse:
        if not request.HasField("experiment"):
            raise InvalidArgument("experiment: expected the experiment to create")
        created = await self._domain().catalog.create(request.experiment, caller_identity(context))
        return pb.CreateExperimentResponse(experiment=created)

    async def GetExperiment(self, request: pb.GetExperimentRequest, context: Context) -> pb.GetExperimentResponse:
        return pb.GetExperimentResponse(experiment=await self._domain().catalog.require(request.key))

    async def ListExperiments(self, request: pb.ListExperimentsRequest, context: Context) -> pb.ListExperimentsResponse:
        for i, status in enumerate(request.statuses):
            if status not in xpb.ExperimentStatus.values() or status == xpb.EXPERIMENT_STATUS_UNSPECIFIED:
                raise InvalidArgument(f"statuses[{i}]: expected DRAFT, RUNNING, STOPPED or DECIDED, got {status}")
        if not 0 <= request.page_size <= MAX_PAGE:
            raise InvalidArgument(f"page_size: expected 0..{MAX_PAGE} (0 for {DEFAULT_PAGE}), got {request.page_size}")
        after = pages.last_key("page_token", _PAGES, request.page_token) if request.page_token else ""
        size = request.page_size or DEFAULT_PAGE
        found, more = await self._domain().catalog.page(list(request.statuses), request.model_name, size, after)
        token = pages.token(_PAGES, found[-1].key) if more and found else ""
        return pb.ListExperimentsResponse(experiments=found, next_page_token=token)

    async def UpdateExperiment(
        self, request: pb.UpdateExperimentRequest, context: Context
    ) -> pb.UpdateExperimentResponse:
        key = request.experiment.key
        updated, new_phase = await self._domain().catalog.update(
            key, request.experiment, list(request.update_mask.paths), request.expected_version,
            caller_identity(context),
        )  # fmt: skip
        return pb.UpdateExperimentResponse(experiment=updated, new_phase=new_phase)

    async def StartExperiment(self, request: pb.StartExperimentRequest, context: Context) -> pb.StartExperimentResponse:
        started = await self._domain().catalog.start(request.key, request.expected_version, caller_identity(context))
        return pb.StartExperimentResponse(experiment=started)

    async def StopExperiment(self, request: pb.StopExperimentRequest, context: Context) -> pb.StopExperimentResponse:
        catalog = self._domain().catalog
        stopped = await catalog.stop(request.key, request.expected_version, request.reason, caller_identity(context))
        return pb.StopExperimentResponse(experiment=stopped)

    async def ListAuditEntries(
        self, request: pb.ListAuditEntriesRequest, context: Context
    ) -> pb.ListAuditEntriesResponse:
        return pb.ListAuditEntriesResponse(entries=await self._domain().catalog.audit(request.key))
