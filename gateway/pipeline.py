"""The prediction pipeline: group queries per model version, pin each group to the version that
will answer, build tensors from that version's signature and the served features, call the routed
predictor once per group, split the answers back per query."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from chassis.errors import FailedPrecondition, FrescoError, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from chassis.status import status_for
from fresco.api.common.v1 import values_pb2
from fresco.api.gateway.v1 import gateway_pb2 as pb
from fresco.api.inference import grpc_service_pb2 as ipb
from gateway.assembly import FeatureValue, ModelSignature, build_inputs, from_proto, split_rows
from gateway.budget import Budget
from gateway.features import FeatureClient, entity_identity, merge_entity_keys, needed_refs, usable_values
from gateway.limits import Limits
from gateway.metric_windows import MetricWindows, WindowKey
from gateway.offload import BYTES_PER_VALUE, Offload
from gateway.predictors import STALE_SUSPECTS, Pinned, PredictorPool, decode_outputs
from gateway.route_choice import RouteChooser, Target
from gateway.routing import RouteTable
from gateway.shadow import ShadowJob, ShadowMirror, score_of
from model_manager.routes import RouteTable as ManagedTable

GroupKey = tuple[Target, tuple[str, ...]]
# A chosen version failing so: its route's fallback version answers instead (a caller's mistake never falls back).
FALLBACK_ON = (Unavailable, NotFound, ResourceExhausted, FailedPrecondition)


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
    fallback_reason: str = ""
    imputed_features: list[str] = field(default_factory=list)
    degraded: bool = False


@dataclass
class QueryFeatures:
    """Each query's feature values and how they were served."""

    rows: list[dict[str, FeatureValue]]
    imputed: list[list[str]]
    degraded: list[bool]


@dataclass(frozen=True)
class Attempt:
    """A target pinned at one of its endpoints; `fallback_reason` set when it stands in for the chosen one."""

    target: Target
    endpoint: str
    pinned: Pinned
    fallback_reason: str = ""


class StaleSignature(Exception):
    """A cached signature no longer described the version: the call is redone on fresh metadata."""


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
    ) -> None:
        self.features = features
        self.chooser = routes if isinstance(routes, RouteChooser) else RouteChooser(routes)
        self.windows = windows
        self.shadow: ShadowMirror | None = None
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
        started = time.perf_counter()
        chooser = self.chooser
        table = chooser.table()  # one table for the whole request, whatever is published meanwhile
        groups: dict[GroupKey, list[int]] = {}
        for index, query in enumerate(queries):
            target = chooser.target(table, query.model, query.version, query.unit_id)
            groups.setdefault((target, query.outputs), []).append(index)
        keys = list(groups)
        # Static routes pick their endpoint once per group, round-robin, as they always did.
        targets = [t if t.endpoints else replace(t, endpoints=(chooser.static.endpoint_for(t.model),)) for t, _ in keys]
        attempts = await asyncio.gather(
            *(
                self._pin_or_fallback(table, t, budget, started, len(groups[k]))
                for t, k in zip(targets, keys, strict=True)
            )
        )
        served = await self._with_entity_features(queries, groups, [a.pinned.signature for a in attempts], budget)
        answers: list[Prediction | None] = [None] * len(queries)

        async def run(key: GroupKey, attempt: Attempt) -> None:
            indices = groups[key]
            rows = [served.rows[i] for i in indices]
            labels = [queries[i].label for i in indices]
            outputs = key[1]
            attempt, response = await self._infer_or_fallback(
                table, attempt, rows, labels, outputs, budget, retry, started
            )
            weight = sum(len(raw) for raw in response.raw_output_contents)
            per_row = await self.offload.run(weight, _split_answer, response, attempt.endpoint, len(indices))
            target = attempt.target
            for index, tensors in zip(indices, per_row, strict=True):
                answers[index] = Prediction(
                    model=target.model,
                    model_version=response.model_version,
                    outputs=tensors,
                    fallback=bool(attempt.fallback_reason),
                    fallback_reason=attempt.fallback_reason,
                    imputed_features=served.imputed[index],
                    degraded=served.degraded[index],
                )
            self._observe(target, len(indices), "OK", started, per_row)
            if not attempt.fallback_reason:
                self._mirror(table, target, [queries[i] for i in indices], rows, outputs, per_row)

        await asyncio.gather(*(run(k, a) for k, a in zip(keys, attempts, strict=True)))
        return [answer for answer in answers if answer is not None]

    async def _pin_any(self, target: Target, budget: Budget) -> tuple[str, Pinned]:
        """The first of the target's endpoints that pins its version; an unreachable one is skipped."""
        health = self.chooser.health
        for position, endpoint in enumerate(target.endpoints):
            try:
                pinned = await self.predictors.pin(endpoint, target.predictor_model, target.version, budget)
            except Unavailable:
                health.failed(endpoint)
                if position + 1 == len(target.endpoints):
                    raise
                continue
            return endpoint, pinned
        raise Unavailable(f"model {target.model!r} version {target.version!r}: the route lists no endpoint")

    def _fallback(self, table: ManagedTable | None, target: Target) -> Target | None:
        route = target.route
        if table is None or route is None or not route.fallback or route.fallback == target.version:
            return None
        return self.chooser.version_target(table, route, route.version(route.fallback), "")

    async def _pin_or_fallback(
        self, table: ManagedTable | None, target: Target, budget: Budget, started: float, count: int
    ) -> Attempt:
        """The target pinned, or its route's fallback when it cannot be; failures are counted."""
        try:
            return Attempt(target, *await self._pin_any(target, budget))
        except FALLBACK_ON as err:
            fallback = self._fallback(table, target)
            self._observe(target, count, status_for(err).name, started, fallback=fallback is not None)
            if fallback is None:
                raise
            reason = f"version {target.version} failed: {err}"
            try:
                return Attempt(fallback, *await self._pin_any(fallback, budget), fallback_reason=reason)
            except FrescoError as spare_err:
                self._observe(fallback, count, status_for(spare_err).name, started)
                raise
        except FrescoError as err:
            self._observe(target, count, status_for(err).name, started)
            raise

    async def _infer_or_fallback(
        self,
        table: ManagedTable | None,
        attempt: Attempt,
        rows: list[dict[str, FeatureValue]],
        labels: list[str],
        outputs: tuple[str, ...],
        budget: Budget,
        retry: bool,
        started: float,
    ) -> tuple[Attempt, ipb.ModelInferResponse]:
        """The attempt's answer, or its route's fallback's when it fails; failures are counted."""
        try:
            return await self._infer_any(attempt, rows, labels, outputs, budget, retry)
        except FALLBACK_ON as err:
            fallback = None if attempt.fallback_reason else self._fallback(table, attempt.target)
            self._observe(attempt.target, len(rows), status_for(err).name, started, fallback=fallback is not None)
            if fallback is None:
                raise
            reason = f"version {attempt.target.version} failed: {err}"
            try:
                spare = Attempt(fallback, *await self._pin_any(fallback, budget), fallback_reason=reason)
                return await self._infer_any(spare, rows, labels, outputs, budget, retry=False)
            except FrescoError as spare_err:
                self._observe(fallback, len(rows), status_for(spare_err).name, started)
                raise
        except FrescoError as err:
            self._observe(attempt.target, len(rows), status_for(err).name, started)
            raise

    async def _infer_any(
        self,
        attempt: Attempt,
        rows: list[dict[str, FeatureValue]],
        labels: list[str],
        outputs: tuple[str, ...],
        budget: Budget,
        retry: bool,
    ) -> tuple[Attempt, ipb.ModelInferResponse]:
        """Inference at the pinned endpoint, failing over to the target's next endpoints when it is unreachable."""
        target, health = attempt.target, self.chooser.health
        remaining = [e for e in target.endpoints if e != attempt.endpoint]
        weight = BYTES_PER_VALUE * sum(len(row) for row in rows)
        while True:
            endpoint, pinned = attempt.endpoint, attempt.pinned
            inputs = await self.offload.run(weight, build_inputs, pinned.signature, rows, labels, self.limits)
            try:
                response = await self.predictors.infer(endpoint, pinned, inputs, outputs, budget)
            except Unavailable:
                if not remaining:
                    raise
                health.failed(endpoint)
                attempt = replace(
                    attempt,
                    endpoint=remaining[0],
                    pinned=(await self._pin_any(replace(target, endpoints=tuple(remaining)), budget))[1],
                )
                remaining = remaining[1:]
                continue
            except STALE_SUSPECTS as err:
                version = target.version
                if retry and await self.predictors.repin(endpoint, target.predictor_model, version, budget) != pinned:
                    raise StaleSignature(str(err)) from err
                raise
            health.succeeded(endpoint)
            return attempt, response

    def _observe(
        self,
        target: Target,
        count: int,
        status: str,
        started: float,
        answers: Sequence[dict[str, values_pb2.Tensor]] = (),
        *,
        fallback: bool = False,
    ) -> None:
        """Count requests to a managed route's version in the metric windows (`fallback`: answered by
        the route's fallback instead)."""
        if self.windows is None or target.route is None:
            return
        route = target.route
        key = WindowKey(target.model, target.version, target.revision)
        latency_ms = (time.perf_counter() - started) * 1000
        for index in range(count):
            score = score_of(answers[index], route.score_output) if answers else None
            self.windows.record(
                key,
                target.metrics,
                status,
                latency_ms,
                scores=() if score is None else (score,),
                score_output=route.score_output,
                score_bounds=route.score_bounds,
                fallback=fallback,
            )

    def _mirror(
        self,
        table: ManagedTable | None,
        target: Target,
        queries: Sequence[Query],
        rows: list[dict[str, FeatureValue]],
        outputs: tuple[str, ...],
        answers: Sequence[dict[str, values_pb2.Tensor]],
    ) -> None:
        """Offer the sampled rows of an answered group to the shadow version; never waits."""
        route = target.route
        if self.shadow is None or route is None or route.shadow is None or route.shadow.version == target.version:
            return
        picked = [i for i in range(len(rows)) if self.shadow.sampled(route.shadow.share)]
        if not picked or table is None:
            return
        shadow_target = self.chooser.version_target(
            table, route, route.version(route.shadow.version), queries[picked[0]].unit_id
        )
        self.shadow.offer(
            ShadowJob(
                shadow_target,
                table.metrics,
                [rows[i] for i in picked],
                [queries[i].label for i in picked],
                outputs,
                [dict(answers[i]) for i in picked],
            )
        )

    async def shadow_call(self, job: ShadowJob, timeout_s: float) -> list[dict[str, values_pb2.Tensor]]:
        """The shadow version's answers to a mirrored job, within its own deadline."""
        budget = Budget(timeout_s)
        endpoint, pinned = await self._pin_any(job.target, budget)
        inputs = build_inputs(pinned.signature, job.rows, job.labels, self.limits)
        response = await self.predictors.infer(endpoint, pinned, inputs, job.outputs, budget)
        return _split_answer(response, endpoint, len(job.rows))

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
