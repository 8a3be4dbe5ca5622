"""Calls to a routed model version: pinned at the first reachable endpoint in rendezvous order,
failed over to the next ones, answered by the route's fallback version when the chosen one fails
(with the reason), counted in the metric windows, and mirrored to the route's shadow version."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np

from chassis.errors import FailedPrecondition, FrescoError, NotFound, ResourceExhausted, Unavailable
from chassis.status import status_for
from fresco.api.common.v1 import values_pb2
from fresco.api.inference import grpc_service_pb2 as ipb
from gateway.assembly import FeatureValue, ModelSignature, build_inputs, split_rows
from gateway.budget import Budget
from gateway.limits import Limits
from gateway.metric_windows import MetricWindows, WindowKey
from gateway.offload import BYTES_PER_VALUE, Offload
from gateway.predictors import STALE_SUSPECTS, Pinned, PredictorPool, decode_outputs
from gateway.route_choice import RouteChooser, Target
from gateway.shadow import ShadowJob, ShadowMirror, score_of, score_output
from gateway.window_sketches import Called
from model_manager.routes import ModelRoute, StaticValue
from model_manager.routes import RouteTable as ManagedTable

T = TypeVar("T")

# A chosen version failing so: its route's fallback version answers instead (a caller's mistake never falls back).
FALLBACK_ON = (Unavailable, NotFound, ResourceExhausted, FailedPrecondition)


@dataclass(frozen=True)
class Attempt:
    """A target pinned at one of its endpoints; `fallback_reason` set when it stands in for the chosen one."""

    target: Target
    endpoint: str
    pinned: Pinned
    fallback_reason: str = ""
    static: bool = False  # the route's static answer, no version: nothing to call


@dataclass(frozen=True)
class Answer:
    """A version's inference answer and the input tensors it was called with."""

    response: ipb.ModelInferResponse
    inputs: dict[str, np.ndarray]


class StaleSignature(Exception):
    """A cached signature no longer described the version: the call is redone on fresh metadata."""


def static_tensor(value: StaticValue) -> values_pb2.Tensor:
    """One output of a static answer as a tensor: a scalar has shape [1], a list its length."""
    items: tuple[object, ...] = value if isinstance(value, tuple) else (value,)
    tensor = values_pb2.Tensor(shape=[len(items)])
    if all(isinstance(v, bool) for v in items):
        tensor.datatype = "BOOL"
        tensor.bool_values.extend(v for v in items if isinstance(v, bool))
    elif all(isinstance(v, str | bytes) for v in items):
        tensor.datatype = "BYTES"
        tensor.bytes_values.extend(v.encode() if isinstance(v, str) else v for v in items if isinstance(v, str | bytes))
    elif all(isinstance(v, int) for v in items):
        tensor.datatype = "INT64"
        tensor.int64_values.extend(v for v in items if isinstance(v, int))
    else:
        tensor.datatype = "FP64"
        tensor.double_values.extend(float(v) for v in items if isinstance(v, int | float))
    return tensor


def static_outputs(route: ModelRoute, wanted: Sequence[str]) -> dict[str, values_pb2.Tensor]:
    """A route's static answer for one row, restricted to the outputs asked for (all when none)."""
    return {name: static_tensor(value) for name, value in route.static_answer if not wanted or name in wanted}


def split_answer(response: ipb.ModelInferResponse, endpoint: str, batch: int) -> list[dict[str, values_pb2.Tensor]]:
    """An inference answer split back into one set of output tensors per row."""
    return split_rows(decode_outputs(response, endpoint), batch)


class RoutedCalls:
    """Pinning and inference for chosen targets, with failover, fallback, metric windows and shadow."""

    def __init__(
        self,
        chooser: RouteChooser,
        predictors: PredictorPool,
        limits: Limits,
        offload: Offload,
        windows: MetricWindows | None = None,
    ) -> None:
        self.chooser = chooser
        self.predictors = predictors
        self.limits = limits
        self.offload = offload
        self.windows = windows
        self.shadow: ShadowMirror | None = None

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

    def _static(self, target: Target, reason: str) -> Attempt | None:
        """The route's static answer standing in for every version, when the route has one."""
        route = target.route
        if route is None or not route.static_answer:
            return None
        return Attempt(target, "", Pinned("", ModelSignature(target.model, (), ())), reason, static=True)

    def _static_or_raise(self, fallback: Target, reason: str, err: FrescoError, count: int, started: float) -> Attempt:
        """After the fallback version failed too: the static answer, else the error."""
        static = self._static(fallback, f"{reason}; fallback version {fallback.version} failed: {err}")
        self.observe(fallback, count, status_for(err).name, started, fallback=static is not None)
        if static is None:
            raise err
        return static

    def _fall_back(
        self, table: ManagedTable | None, target: Target, err: FrescoError, count: int, started: float
    ) -> Attempt | tuple[Target, str]:
        """After `target` failed with `err` (counted here): its route's fallback version with the reason, else its
        static answer; `err` again when the route has neither."""
        reason = f"version {target.version} failed: {err}"
        fallback, static = self._fallback(table, target), self._static(target, reason)
        self.observe(target, count, status_for(err).name, started, fallback=bool(fallback or static))
        if fallback is not None:
            return fallback, reason
        if static is None:
            raise err
        return static

    async def _spare(
        self, fallback: Target, reason: str, count: int, started: float, call: Callable[[], Awaitable[T]]
    ) -> T | Attempt:
        """`call` on the fallback version; when that fails too, the static answer (or the error), counted."""
        try:
            return await call()
        except FALLBACK_ON as spare_err:
            return self._static_or_raise(fallback, reason, spare_err, count, started)
        except FrescoError as spare_err:
            self.observe(fallback, count, status_for(spare_err).name, started)
            raise

    async def pin_or_fallback(
        self, table: ManagedTable | None, target: Target, budget: Budget, started: float, count: int
    ) -> Attempt:
        """The target pinned, or its route's fallback version, or its static answer; failures are counted."""
        try:
            return Attempt(target, *await self._pin_any(target, budget))
        except FALLBACK_ON as err:
            chosen = self._fall_back(table, target, err, count, started)
            if isinstance(chosen, Attempt):
                return chosen
            fallback, reason = chosen

            async def pin() -> Attempt:
                return Attempt(fallback, *await self._pin_any(fallback, budget), fallback_reason=reason)

            return await self._spare(fallback, reason, count, started, pin)
        except FrescoError as err:
            self.observe(target, count, status_for(err).name, started)
            raise

    async def infer_or_fallback(
        self,
        table: ManagedTable | None,
        attempt: Attempt,
        rows: list[dict[str, FeatureValue]],
        labels: list[str],
        outputs: tuple[str, ...],
        budget: Budget,
        retry: bool,
        started: float,
    ) -> tuple[Attempt, Answer | None]:
        """The attempt's answer, or its route's fallback version's, or (no answer) its static answer;
        failures are counted."""
        count = len(rows)
        try:
            return await self._infer_any(attempt, rows, labels, outputs, budget, retry)
        except FALLBACK_ON as err:
            target = attempt.target
            if attempt.fallback_reason:  # the fallback version itself failed
                return self._static_or_raise(target, attempt.fallback_reason, err, count, started), None
            chosen = self._fall_back(table, target, err, count, started)
            if isinstance(chosen, Attempt):
                return chosen, None
            fallback, reason = chosen

            async def infer() -> tuple[Attempt, Answer]:
                spare = Attempt(fallback, *await self._pin_any(fallback, budget), fallback_reason=reason)
                return await self._infer_any(spare, rows, labels, outputs, budget, retry=False)

            answered = await self._spare(fallback, reason, count, started, infer)
            return (answered, None) if isinstance(answered, Attempt) else answered
        except FrescoError as err:
            self.observe(attempt.target, count, status_for(err).name, started)
            raise

    async def _infer_any(
        self,
        attempt: Attempt,
        rows: list[dict[str, FeatureValue]],
        labels: list[str],
        outputs: tuple[str, ...],
        budget: Budget,
        retry: bool,
    ) -> tuple[Attempt, Answer]:
        """Inference at the pinned endpoint, failing over to the target's next endpoints when it is unreachable."""
        target, health = attempt.target, self.chooser.health
        order = list(target.endpoints)
        # Only the replicas after the pinned one: those before it already failed to pin.
        remaining = order[order.index(attempt.endpoint) + 1 :] if attempt.endpoint in order else []
        weight = BYTES_PER_VALUE * sum(len(row) for row in rows)
        while True:
            endpoint, pinned = attempt.endpoint, attempt.pinned
            inputs = await self.offload.run(weight, build_inputs, pinned.signature, rows, labels, self.limits)
            try:
                response = await self.predictors.infer(endpoint, pinned, inputs, outputs, budget)
            except STALE_SUSPECTS as err:
                if isinstance(err, Unavailable) and remaining:  # unreachable or not ready: the next replica
                    health.failed(endpoint)
                    endpoint, pinned = await self._pin_any(replace(target, endpoints=tuple(remaining)), budget)
                    remaining = remaining[remaining.index(endpoint) + 1 :]
                    attempt = replace(attempt, endpoint=endpoint, pinned=pinned)
                    continue
                version = target.version
                if retry and await self.predictors.repin(endpoint, target.predictor_model, version, budget) != pinned:
                    raise StaleSignature(str(err)) from err
                raise
            health.succeeded(endpoint)
            return attempt, Answer(response, inputs)

    def observe(
        self,
        target: Target,
        count: int,
        status: str,
        started: float,
        answers: Sequence[dict[str, values_pb2.Tensor]] = (),
        *,
        fallback: bool = False,
        called: Called | None = None,
        predictions: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Count requests to a managed route's version in the metric windows (`fallback`: answered by
        the route's fallback instead), with the inputs an answering version was `called` with and the
        `predictions` (request id, unit id) of its answers."""
        if self.windows is None or target.route is None:
            return
        route = target.route
        key = WindowKey(target.model, target.version, target.revision)
        latency_ms = (time.perf_counter() - started) * 1000
        self.windows.record(
            key,
            target.metrics,
            status,
            latency_ms,
            count=count,
            scores=[score_of(answer, route.score_output) for answer in answers],
            score_output=score_output(answers[0], route.score_output) if answers else route.score_output,
            score_bounds=route.score_bounds,
            fallback=fallback,
            called=called,
            predictions=predictions,
        )

    def mirror(
        self,
        table: ManagedTable | None,
        target: Target,
        labels: Sequence[str],
        unit_id: str,
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
        shadow_target = self.chooser.version_target(table, route, route.version(route.shadow.version), unit_id)
        self.shadow.offer(
            ShadowJob(
                shadow_target,
                table.metrics,
                [rows[i] for i in picked],
                [labels[i] for i in picked],
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
        return split_answer(response, endpoint, len(job.rows))
