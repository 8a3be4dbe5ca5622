"""The prediction pipeline: choose each query's target (from one route table per request), group
queries per target, pin each group to the version that will answer, build tensors from that
version's signature and the served features, call the routed predictor once per group (with
failover and fallback, `gateway.routed_calls`), split the answers back per query."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from chassis.errors import FailedPrecondition, InvalidArgument
from fresco.api.common.v1 import values_pb2
from fresco.api.gateway.v1 import gateway_pb2 as pb
from fresco.experiments.evaluator import Assigned
from gateway.assembly import FeatureValue, ModelSignature, from_proto
from gateway.budget import Budget
from gateway.experiment_arms import ArmResult, ExperimentArms
from gateway.features import FeatureClient, entity_identity, merge_entity_keys, needed_refs, usable_values
from gateway.limits import Limits
from gateway.metric_windows import MetricWindows
from gateway.offload import Offload
from gateway.predictors import PredictorPool
from gateway.route_choice import RouteChooser, Target
from gateway.routed_calls import Attempt, RoutedCalls, StaleSignature, split_answer, static_outputs
from gateway.routing import RouteTable
from gateway.window_sketches import Called

GroupKey = tuple[Target, tuple[str, ...]]
T = TypeVar("T")


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
    unit_ids: dict[str, str] = field(default_factory=dict)  # by unit type, for experiments
    attributes: dict[str, values_pb2.Value] = field(default_factory=dict)  # for experiment targeting
    # The caller's, else one generated here (returned in the answer): late labels are joined by it.
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

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
            unit_ids=dict(request.unit_ids),
            attributes=dict(request.attributes),
            request_id=request.request_id or uuid.uuid4().hex,
        )


def decode_queries(requests: Sequence[pb.PredictRequest], labels: Sequence[str], limits: Limits) -> list[Query]:
    """Queries of requests, `labels[i]` naming request i in errors."""
    return [Query.from_proto(request, label, limits) for request, label in zip(requests, labels, strict=True)]


async def _all(steps: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Every step's result, concurrently; a single step (one group, the usual request) is awaited as it is,
    without the task `asyncio.gather` would wrap it in."""
    if len(steps) == 1:
        return [await steps[0]]
    return list(await asyncio.gather(*steps))


@dataclass
class Prediction:
    """One answer."""

    model: str
    model_version: str
    outputs: dict[str, values_pb2.Tensor] = field(default_factory=dict)
    request_id: str = ""
    experiments: list[ArmResult] = field(default_factory=list)
    fallback: bool = False
    fallback_reason: str = ""
    imputed_features: list[str] = field(default_factory=list)
    degraded: bool = False


@dataclass
class QueryFeatures:
    """Each query's feature values and how they were served."""

    rows: list[dict[str, FeatureValue]]
    imputed: list[list[str]]
    degraded: list[bool]


class PredictionPipeline:
    """Everything between a decoded request and its answer."""

    def __init__(
        self,
        routes: RouteTable | RouteChooser,
        predictors: PredictorPool,
        features: FeatureClient | None = None,
        limits: Limits | None = None,
        offload: Offload | None = None,
        windows: MetricWindows | None = None,
        experiments: ExperimentArms | None = None,
    ) -> None:
        self.features = features
        self.experiments = experiments
        self.chooser = routes if isinstance(routes, RouteChooser) else RouteChooser(routes)
        self.predictors = predictors
        self.limits = limits or Limits()
        self.offload = offload or Offload(above_bytes=1 << 62)
        self.calls = RoutedCalls(self.chooser, predictors, self.limits, self.offload, windows)

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
        # Assigned once, before any retry: a redone call answers the same arms.
        arms = await self.experiments.assign(queries, self.offload) if self.experiments else [[] for _ in queries]
        try:
            return await self._predict(queries, arms, budget, retry=True)
        except StaleSignature:
            return await self._predict(queries, arms, budget, retry=False)

    async def _predict(
        self, queries: Sequence[Query], arms: list[list[Assigned]], budget: Budget, retry: bool
    ) -> list[Prediction]:
        started = time.perf_counter()
        chooser = self.chooser
        table = chooser.table()  # one table for the whole request, whatever is published meanwhile
        experiments = self.experiments
        routed = [
            experiments.routed_version(table, q.model, query_arms) if experiments and query_arms else ""
            for q, query_arms in zip(queries, arms, strict=True)
        ]
        groups: dict[GroupKey, list[int]] = {}
        for index, query in enumerate(queries):
            target = chooser.target(table, query.model, query.version or routed[index], query.unit_id)
            groups.setdefault((target, query.outputs), []).append(index)
        keys = list(groups)
        # Static routes pick their endpoint once per group, round-robin, as they always did.
        targets = [t if t.endpoints else replace(t, endpoints=(chooser.static.endpoint_for(t.model),)) for t, _ in keys]
        attempts = await _all(
            [
                self.calls.pin_or_fallback(table, t, budget, started, len(groups[k]))
                for t, k in zip(targets, keys, strict=True)
            ]
        )
        served = await self._with_entity_features(queries, groups, [a.pinned.signature for a in attempts], budget)
        answers: list[Prediction | None] = [None] * len(queries)

        async def run(key: GroupKey, attempt: Attempt) -> None:
            indices = groups[key]
            rows = [served.rows[i] for i in indices]
            labels = [queries[i].label for i in indices]
            outputs = key[1]
            answer = None
            if not attempt.static:
                attempt, answer = await self.calls.infer_or_fallback(
                    table, attempt, rows, labels, outputs, budget, retry, started
                )
            target = attempt.target
            if answer is None:  # the route's static answer: no version answered
                assert target.route is not None
                per_row = [static_outputs(target.route, outputs) for _ in indices]
                version = ""
            else:
                response = answer.response
                weight = sum(len(raw) for raw in response.raw_output_contents)
                per_row = await self.offload.run(weight, split_answer, response, attempt.endpoint, len(indices))
                version = response.model_version
            for index, tensors in zip(indices, per_row, strict=True):
                answers[index] = Prediction(
                    model=target.model,
                    model_version=version,
                    outputs=tensors,
                    fallback=bool(attempt.fallback_reason),
                    fallback_reason=attempt.fallback_reason,
                    imputed_features=served.imputed[index],
                    degraded=served.degraded[index],
                    request_id=queries[index].request_id,
                )
            if answer is not None:  # counted under the version that answered (the fallback's, when it did)
                self.calls.observe(
                    target,
                    len(indices),
                    "OK",
                    started,
                    per_row,
                    called=Called(attempt.pinned.signature, answer.inputs),
                    predictions=[(queries[i].request_id, queries[i].unit_id) for i in indices],
                )
            if not attempt.fallback_reason:
                self.calls.mirror(table, target, labels, queries[indices[0]].unit_id, rows, outputs, per_row)

        await _all([run(k, a) for k, a in zip(keys, attempts, strict=True)])
        predictions = [answer for answer in answers if answer is not None]
        if experiments is not None:  # only once every group answered: a failed request exposes no one
            for prediction, query_arms, version in zip(predictions, arms, routed, strict=True):
                if query_arms:
                    prediction.experiments = experiments.results(
                        query_arms, version, prediction.model_version, prediction.fallback
                    )
        return predictions

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
