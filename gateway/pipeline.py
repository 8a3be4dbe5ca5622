"""The prediction pipeline: group queries per model version, build tensors from features, call the
routed predictor once per group, split the answers back per query."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from chassis.errors import FailedPrecondition, InvalidArgument
from fresco.api.common.v1 import values_pb2
from fresco.api.gateway.v1 import gateway_pb2 as pb
from gateway.assembly import FeatureValue, build_inputs, from_proto, split_rows
from gateway.predictors import PredictorPool
from gateway.routing import RouteTable


@dataclass(frozen=True)
class Query:
    """One prediction asked for, decoded from the wire."""

    label: str
    model: str
    version: str
    features: dict[str, FeatureValue]
    outputs: tuple[str, ...] = ()
    unit_id: str = ""
    entity_count: int = 0

    @classmethod
    def from_proto(cls, request: pb.PredictRequest, label: str) -> Query:
        if not request.model:
            raise InvalidArgument(f"{label}.model: expected a model name, got an empty string")
        return cls(
            label=label,
            model=request.model,
            version=request.version,
            features={name: from_proto(value) for name, value in request.features.items()},
            outputs=tuple(request.outputs),
            unit_id=request.unit_id,
            entity_count=len(request.entity_keys),
        )


@dataclass
class Prediction:
    """One answer."""

    model: str
    model_version: str
    outputs: dict[str, values_pb2.Tensor] = field(default_factory=dict)
    experiment_arm: str = ""
    fallback: bool = False


class PredictionPipeline:
    """Everything between a decoded request and its answer."""

    def __init__(self, routes: RouteTable, predictors: PredictorPool) -> None:
        self.routes = routes
        self.predictors = predictors

    async def predict(self, queries: Sequence[Query], time_remaining: float | None) -> list[Prediction]:
        """Answers in query order; one predictor call per (model, version, outputs) group."""
        for query in queries:
            if query.entity_count:
                raise FailedPrecondition(
                    f"{query.label}.entity_keys: this gateway has no feature service to fetch entity "
                    "features from; send named features instead"
                )
        groups: dict[tuple[str, str, tuple[str, ...]], list[int]] = {}
        for index, query in enumerate(queries):
            groups.setdefault((query.model, query.version, query.outputs), []).append(index)
        answers: list[Prediction | None] = [None] * len(queries)

        async def run(key: tuple[str, str, tuple[str, ...]], indices: list[int]) -> None:
            model, version, outputs = key
            endpoint = self.routes.endpoint_for(model)
            signature = await self.predictors.signature(endpoint, model, version)
            members = [queries[i] for i in indices]
            inputs = build_inputs(signature, [q.features for q in members], [q.label for q in members])
            served, results = await self.predictors.infer(endpoint, model, version, inputs, outputs, time_remaining)
            for index, tensors in zip(indices, split_rows(results, len(indices)), strict=True):
                answers[index] = Prediction(model=model, model_version=served, outputs=tensors)

        await asyncio.gather(*(run(key, indices) for key, indices in groups.items()))
        return [answer for answer in answers if answer is not None]
