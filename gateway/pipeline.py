"""The prediction pipeline: group queries per model version, pin each group to the version that
will answer, build tensors from that version's signature and the served features, call the routed
predictor once per group, split the answers back per query."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from chassis.errors import FailedPrecondition, InvalidArgument
from fresco.api.common.v1 import values_pb2
from fresco.api.gateway.v1 import gateway_pb2 as pb
from fresco.api.inference import grpc_service_pb2 as ipb
from gateway.assembly import FeatureValue, ModelSignature, build_inputs, from_proto, split_rows
from gateway.budget import Budget
from gateway.features import FeatureClient, entity_identity, merge_entity_keys, needed_refs, usable_values
from gateway.limits import Limits
from gateway.offload import BYTES_PER_VALUE, Offload
from gateway.predictors import STALE_SUSPECTS, Pinned, PredictorPool, decode_outputs
from gateway.routing import RouteTable

GroupKey = tuple[str, str, tuple[str, ...]]


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
    def from_proto(cls, request: pb.PredictRequest, label: str, limits: Limits | None = None) -> Query:
        if not request.model:
            raise InvalidArgument(f"{label}.model: expected a model name, got an empty string")
        limits = limits or Limits()
        for name, value in request.features.items():
            if value.WhichOneof("kind") == "string_list":  # counted before a single string is converted
                limits.check_strings(f"{label}.features[{name!r}]", len(value.string_list.values))
        return cls(
            label=label,
            model=request.model,
            version=request.version,
            features={name: from_proto(value) for name, value in request.features.items()},
            outputs=tuple(request.outputs),
            unit_id=request.unit_id,
            entity=merge_entity_keys(request.entity_keys) if request.entity_keys else None,
        )


def decode_queries(requests: Sequence[pb.PredictRequest], labels: Sequence[str], limits: Limits) -> list[Query]:
    """Queries of requests, `labels[i]` naming request i in errors."""
    return [Query.from_proto(request, label, limits) for request, label in zip(requests, labels, strict=True)]


@dataclass
class Prediction:
    """One answer."""

    model: str
    model_version: str
    outputs: dict[str, values_pb2.Tensor] = field(default_factory=dict)
    experiment_arm: str = ""
    fallback: bool = False
    imputed_features: list[str] = field(default_factory=list)
    degraded: bool = False


@dataclass
class QueryFeatures:
    """Each query's feature values and how they were served."""

    rows: list[dict[str, FeatureValue]]
    imputed: list[list[str]]
    degraded: list[bool]


class StaleSignature(Exception):
    """A cached signature no longer described the version: the call is redone on fresh metadata."""


class PredictionPipeline:
    """Everything between a decoded request and its answer."""

    def __init__(
        self,
        routes: RouteTable,
        predictors: PredictorPool,
        features: FeatureClient | None = None,
        limits: Limits | None = None,
        offload: Offload | None = None,
    ) -> None:
        self.features = features
        self.routes = routes
        self.predictors = predictors
        self.limits = limits or Limits()
        self.offload = offload or Offload(above_bytes=1 << 62)

    async def predict(self, queries: Sequence[Query], budget: Budget) -> list[Prediction]:
        """Answers in query order: one feature-service call for the whole request, then one
        predictor call per (model, version, outputs) group, each hop within the caller's budget.

        When the predictor refuses a request built from a cached signature and its metadata has
        changed since, the whole call is redone once on the fresh metadata (features included):
        no inference ran on tensors it did not accept, and none is returned for a version other
        than the one the tensors were built for."""
        if self.features is None and (with_keys := [q for q in queries if q.entity is not None]):
            raise FailedPrecondition(
                f"{with_keys[0].label}.entity_keys: this gateway has no feature service to fetch entity features "
                "from (start it with --feature-service HOST:PORT); send named features instead"
            )
        try:
            return await self._predict(queries, budget, retry=True)
        except StaleSignature:
            return await self._predict(queries, budget, retry=False)

    async def _predict(self, queries: Sequence[Query], budget: Budget, retry: bool) -> list[Prediction]:
        groups: dict[GroupKey, list[int]] = {}
        for index, query in enumerate(queries):
            groups.setdefault((query.model, query.version, query.outputs), []).append(index)
        keys = list(groups)
        routed = [self.routes.endpoint_for(model) for model, _, _ in keys]
        pins = await asyncio.gather(
            *(
                self.predictors.pin(endpoint, model, version, budget)
                for endpoint, (model, version, _) in zip(routed, keys, strict=True)
            )
        )
        served = await self._with_entity_features(queries, groups, [p.signature for p in pins], budget)
        answers: list[Prediction | None] = [None] * len(queries)

        async def run(key: GroupKey, endpoint: str, pinned: Pinned) -> None:
            model, version, outputs = key
            indices = groups[key]
            rows = [served.rows[i] for i in indices]
            labels = [queries[i].label for i in indices]
            weight = BYTES_PER_VALUE * sum(len(row) for row in rows)
            inputs = await self.offload.run(weight, build_inputs, pinned.signature, rows, labels, self.limits)
            try:
                response = await self.predictors.infer(endpoint, pinned, inputs, outputs, budget)
            except STALE_SUSPECTS as err:
                if retry and await self.predictors.repin(endpoint, model, version, budget) != pinned:
                    raise StaleSignature(str(err)) from err
                raise
            weight = sum(len(raw) for raw in response.raw_output_contents)
            per_row = await self.offload.run(weight, _split_answer, response, endpoint, len(indices))
            for index, tensors in zip(indices, per_row, strict=True):
                answers[index] = Prediction(
                    model=model,
                    model_version=response.model_version,
                    outputs=tensors,
                    imputed_features=served.imputed[index],
                    degraded=served.degraded[index],
                )

        await asyncio.gather(*(run(k, e, p) for k, e, p in zip(keys, routed, pins, strict=True)))
        return [answer for answer in answers if answer is not None]

    async def _with_entity_features(
        self,
        queries: Sequence[Query],
        groups: dict[GroupKey, list[int]],
        signatures: Sequence[ModelSignature],
        budget: Budget,
    ) -> QueryFeatures:
        """Each query's features: what the caller sent, plus what its entity has in the feature
        service for every "view:feature" its model needs and the caller did not send."""
        served = QueryFeatures([dict(q.features) for q in queries], [[] for _ in queries], [False for _ in queries])
        wanted: dict[int, tuple[values_pb2.EntityKey, list[str]]] = {}
        for signature, indices in zip(signatures, groups.values(), strict=True):
            names = [name for spec in signature.inputs for name in (spec.feature_names or (spec.name,))]
            for index in indices:
                entity = queries[index].entity
                if entity is not None and (refs := needed_refs(names, served.rows[index])):
                    wanted[index] = (entity, refs)
        if not wanted or self.features is None:
            return served
        entities: dict[bytes, int] = {}
        order: list[values_pb2.EntityKey] = []
        for entity, _ in wanted.values():
            identity = entity_identity(entity)
            if identity not in entities:
                entities[identity] = len(order)
                order.append(entity)
        refs = sorted({ref for _, refs in wanted.values() for ref in refs})
        fetched = await self.features.fetch(order, refs, budget)
        for index, (entity, index_refs) in wanted.items():
            values, imputed = usable_values(
                index_refs, fetched.rows[entities[entity_identity(entity)]], entity, queries[index].label
            )
            served.rows[index].update(values)
            served.imputed[index] = imputed
            served.degraded[index] = fetched.degraded or bool(imputed)
        return served


def _split_answer(response: ipb.ModelInferResponse, endpoint: str, batch: int) -> list[dict[str, values_pb2.Tensor]]:
    return split_rows(decode_outputs(response, endpoint), batch)
