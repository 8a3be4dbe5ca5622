"""The prediction pipeline: group queries per model version, build tensors from features, call the
routed predictor once per group, split the answers back per query."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from chassis.errors import FailedPrecondition, InvalidArgument
from fresco.api.common.v1 import values_pb2
from fresco.api.gateway.v1 import gateway_pb2 as pb
from gateway.assembly import FeatureValue, ModelSignature, build_inputs, from_proto, split_rows
from gateway.features import FeatureClient, entity_identity, merge_entity_keys, needed_refs
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
    entity: values_pb2.EntityKey | None = None

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
            entity=merge_entity_keys(request.entity_keys) if request.entity_keys else None,
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

    def __init__(self, routes: RouteTable, predictors: PredictorPool, features: FeatureClient | None = None) -> None:
        self.features = features
        self.routes = routes
        self.predictors = predictors

    async def predict(self, queries: Sequence[Query], time_remaining: float | None) -> list[Prediction]:
        """Answers in query order: one feature-service call for the whole request, then one
        predictor call per (model, version, outputs) group."""
        if self.features is None and (with_keys := [q for q in queries if q.entity is not None]):
            raise FailedPrecondition(
                f"{with_keys[0].label}.entity_keys: this gateway has no feature service to fetch entity features "
                "from (start it with --feature-service HOST:PORT); send named features instead"
            )
        groups: dict[tuple[str, str, tuple[str, ...]], list[int]] = {}
        for index, query in enumerate(queries):
            groups.setdefault((query.model, query.version, query.outputs), []).append(index)
        keys = list(groups)
        routed = [self.routes.endpoint_for(model) for model, _, _ in keys]
        signatures = await asyncio.gather(
            *(
                self.predictors.signature(endpoint, model, version)
                for endpoint, (model, version, _) in zip(routed, keys, strict=True)
            )
        )
        rows = await self._with_entity_features(queries, groups, signatures, time_remaining)
        answers: list[Prediction | None] = [None] * len(queries)

        async def run(key: tuple[str, str, tuple[str, ...]], endpoint: str, signature: ModelSignature) -> None:
            model, version, outputs = key
            indices = groups[key]
            inputs = build_inputs(signature, [rows[i] for i in indices], [queries[i].label for i in indices])
            served, results = await self.predictors.infer(endpoint, model, version, inputs, outputs, time_remaining)
            for index, tensors in zip(indices, split_rows(results, len(indices)), strict=True):
                answers[index] = Prediction(model=model, model_version=served, outputs=tensors)

        await asyncio.gather(*(run(k, e, s) for k, e, s in zip(keys, routed, signatures, strict=True)))
        return [answer for answer in answers if answer is not None]

    async def _with_entity_features(
        self,
        queries: Sequence[Query],
        groups: dict[tuple[str, str, tuple[str, ...]], list[int]],
        signatures: Sequence[ModelSignature],
        time_remaining: float | None,
    ) -> list[dict[str, FeatureValue]]:
        """Each query's features: what the caller sent, plus what its entity has in the feature
        service for every "view:feature" its model needs and the caller did not send."""
        rows = [dict(query.features) for query in queries]
        wanted: dict[int, tuple[values_pb2.EntityKey, list[str]]] = {}
        for signature, indices in zip(signatures, groups.values(), strict=True):
            names = [name for spec in signature.inputs for name in (spec.feature_names or (spec.name,))]
            for index in indices:
                entity = queries[index].entity
                if entity is not None and (refs := needed_refs(names, rows[index])):
                    wanted[index] = (entity, refs)
        if not wanted or self.features is None:
            return rows
        entities: dict[bytes, int] = {}
        order: list[values_pb2.EntityKey] = []
        for entity, _ in wanted.values():
            identity = entity_identity(entity)
            if identity not in entities:
                entities[identity] = len(order)
                order.append(entity)
        refs = sorted({ref for _, refs in wanted.values() for ref in refs})
        fetched = await self.features.fetch(order, refs, time_remaining)
        for index, (entity, index_refs) in wanted.items():
            values = fetched[entities[entity_identity(entity)]]
            for ref in index_refs:
                rows[index][ref] = values.get(ref)
        return rows
