"""UpdateModel: change a model's description, owner, labels, fallback version or static answer (a mixin of the
servicer)."""

from __future__ import annotations

import asyncio
from typing import Any, TypeAlias

from grpc import aio

from chassis.errors import InvalidArgument
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from model_manager import messages
from model_manager.callers import caller_identity
from model_manager.model_serving import ModelUpdate
from model_manager.registry import Registry

Context: TypeAlias = aio.ServicerContext[Any, Any]


def model_update(request: pb.UpdateModelRequest) -> ModelUpdate:
    """The request as an update; the mask must name fields (an empty mask changes nothing and is refused)."""
    if not request.HasField("update_mask") or not request.update_mask.paths:
        raise InvalidArgument("update_mask: expected the model fields to change")
    m = request.model
    return ModelUpdate(
        paths=frozenset(request.update_mask.paths),
        description=m.description,
        owner=m.owner,
        labels=dict(m.labels),
        fallback_version=m.fallback_version,
        static_fallback=m.static_fallback,
    )


class ModelRpcs:
    """UpdateModel, over the registry the servicer's domain holds."""

    def _registry(self) -> Registry:
        return self._domain().registry  # type: ignore[attr-defined,no-any-return]

    async def UpdateModel(self, request: pb.UpdateModelRequest, context: Context) -> pb.UpdateModelResponse:
        update = model_update(request)
        record = await asyncio.to_thread(
            self._registry().update_model, request.model.name, update, caller_identity(context), request.reason
        )
        runtime = getattr(self, "rollouts", None)
        if runtime is not None:  # the routes carry the fallback and static answer: build them again now
            runtime.controller.wake()
        return pb.UpdateModelResponse(model=messages.model_message(record))
