"""The model manager as the experiment service sees it, called with the service's own control token:
- `ship`: the winning version goes through the model's deployment (ApplyDeployment): its promotion gates first,
  then the deployment's rollout strategy (a canary when the model has no deployment yet). Nothing here can force a
  gate;
- `hold` / `release`: a running experiment's arm versions are kept warm and routable at weight 0 (HoldVersions),
  so gateways can pin requests to them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration
from grpc import aio

from chassis.errors import FailedPrecondition
from chassis.status import peer_error
from fresco.api.models.v1 import model_manager_service_pb2 as mpb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as mpb_grpc
from fresco.api.models.v1 import rollout_pb2 as ropb

Reply = TypeVar("Reply")


@dataclass(frozen=True)
class Shipment:
    """What shipping started in the model manager: the gates' operation (empty when the version had passed them)
    and the rollout."""

    operation_id: str
    rollout_id: str


def holder(experiment_key: str) -> str:
    """The name an experiment holds its arm versions under."""
    return f"experiment:{experiment_key}"


def default_strategy(dwell_s: float) -> ropb.RolloutStrategy:
    """The canary a shipped version gets when its model has no deployment: 10%, then 50%, each held `dwell_s`,
    judged on server errors against the baseline."""
    steps = [ropb.CanaryStep(traffic_percent=p, duration=_seconds(dwell_s)) for p in (10.0, 50.0)]
    analysis = ropb.AnalysisThresholds(max_error_rate=0.05, min_samples=50)
    return ropb.RolloutStrategy(canary=ropb.CanaryStrategy(steps=steps, analysis=analysis))


def _seconds(value: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(value * 1e9))
    return d


class ModelManagerPromoter:
    """Shipping and holds over a channel to the model manager (carrying the service's token)."""

    def __init__(
        self, channel: aio.Channel, address: str, timeout_s: float = 10.0, canary_dwell_s: float = 60.0
    ) -> None:
        self.channel = channel
        self.address = address
        self.timeout_s = timeout_s
        self.canary_dwell_s = canary_dwell_s
        self._stub = mpb_grpc.ModelManagerServiceStub(channel)

    async def promote(self, model_name: str, version: int, reason: str) -> Shipment:
        """Declare `version` in the model's deployment, gates included (the deployment's, else the manager's
        configured ones): the manager runs them, then the rollout. Its refusal keeps its code (NOT_FOUND,
        FAILED_PRECONDITION, ABORTED when the deployment changed meanwhile, ...); anything else is UNAVAILABLE."""
        current = await self._deployment(model_name)
        desired = mpb.Deployment(model_name=model_name, strategy=default_strategy(self.canary_dwell_s))
        generation = 0
        if current is not None:
            desired.CopyFrom(current)
            generation = current.generation
            for server_set in ("generation", "updated_at", "updated_by", "rollout_id"):
                desired.ClearField(server_set)
        desired.version = version
        if not desired.HasField("gates"):
            desired.gates.SetInParent()  # empty: the manager's configured gates, never none
        request = mpb.ApplyDeploymentRequest(deployment=desired, expected_generation=generation, reason=reason)
        reply = await self._call(self._stub.ApplyDeployment, request)
        if reply.outcome == mpb.APPLY_OUTCOME_HELD:
            raise FailedPrecondition(f"model manager {self.address}: {reply.message}")
        return Shipment(reply.rollout.gate_operation_id, reply.rollout.rollout_id)

    async def hold(self, model_name: str, experiment_key: str, versions: Sequence[int], reason: str) -> None:
        """Keep `versions` warm and routable at weight 0 for the experiment (none releases them)."""
        request = mpb.HoldVersionsRequest(
            model_name=model_name, holder=holder(experiment_key), versions=sorted(set(versions)), reason=reason
        )
        await self._call(self._stub.HoldVersions, request)

    async def _deployment(self, model_name: str) -> mpb.Deployment | None:
        request = mpb.GetDeploymentRequest(model_name=model_name)
        try:
            return (await self._stub.GetDeployment(request, timeout=self.timeout_s)).deployment
        except aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None  # the model has no deployment yet
            raise self._error(err) from None

    async def _call(self, method: Callable[..., Awaitable[Reply]], request: object) -> Reply:
        try:
            return await method(request, timeout=self.timeout_s)
        except aio.AioRpcError as err:
            raise self._error(err) from None

    def _error(self, err: aio.AioRpcError) -> Exception:
        code = err.code()
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            details = f"{err.details()} (check --model-manager-token-file: this needs a deployer's token)"
        else:
            details = err.details() or code.name
        return peer_error(code, details, f"model manager {self.address}")

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()
