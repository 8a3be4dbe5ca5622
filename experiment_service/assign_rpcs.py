"""Assign: many units in one call, from the configuration gateways watch, through the same `Evaluator`; bandit
arms settled by the sticky store, so a unit keeps its first arm."""

from __future__ import annotations

from typing import Any

from grpc import aio

from chassis.errors import FailedPrecondition, InvalidArgument
from experiment_service.domain import DomainHolder
from experiment_service.validation import check_key
from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_service_pb2 as pb
from fresco.experiments.evaluator import Assigned


class AssignRpcs(DomainHolder):
    """The Assign RPC, for the servicer's bases; `max_assign_units` is set at wiring."""

    max_assign_units: int = 10_000

    async def Assign(self, request: pb.AssignRequest, context: aio.ServicerContext[Any, Any]) -> pb.AssignResponse:
        domain = self._domain()
        if len(request.units) > self.max_assign_units:
            raise InvalidArgument(f"units: expected at most {self.max_assign_units} units, got {len(request.units)}")
        keys = {check_key(k, f"experiment_keys[{i}]") for i, k in enumerate(request.experiment_keys)}
        evaluator = domain.catalog.evaluator  # one configuration for the whole call
        running = set(evaluator.keys())
        stopped: list[apb.Assignment] = []
        for key in sorted(keys - running):
            experiment = await domain.catalog.require(key, "experiment_keys")
            if request.model_name and experiment.model_name != request.model_name:
                continue
            stopped.append(
                apb.Assignment(
                    experiment_key=key,
                    experiment_version=experiment.version,
                    phase=experiment.phases[-1].number if experiment.phases else 0,
                    reason=apb.ASSIGNMENT_REASON_NOT_RUNNING,
                )
            )
        model = request.model_name or None
        per_unit = [
            evaluator.assign(unit.unit_ids, unit.attributes, model, keys) if not keys or keys & running else []
            for unit in request.units
        ]
        flat = [a for assigned in per_unit for a in assigned]
        if any(a.sticky and a.assigned for a in flat):
            if domain.sticky is None:
                raise FailedPrecondition(
                    "experiment_keys: bandit experiments need the sticky-arm store, none is set up"
                )
            settled = iter(await evaluator.settle(flat, domain.sticky))
            per_unit = [[next(settled) for _ in assigned] for assigned in per_unit]
        response = pb.AssignResponse(revision=evaluator.revision)
        for assigned in per_unit:
            response.units.add(assignments=_in_key_order(assigned, stopped))
        return response


def _in_key_order(assigned: list[Assigned], stopped: list[apb.Assignment]) -> list[apb.Assignment]:
    return sorted([*(a.to_proto() for a in assigned), *stopped], key=lambda a: a.experiment_key)
