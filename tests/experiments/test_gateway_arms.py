"""Experiments at a real gateway process in front of a real predictor serving versions 1 and 2: the gateway
starts with the model manager and the experiment service both down, and assigns from the route table and
the assignment configuration kept in its state directory (what a restarted gateway does). Arms route to
their versions (weight-0 route targets included), the response and the trace carry the arm, and an arm
whose version did not answer (a fallback, a version the route cannot serve) is not exposed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc import aio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.api.gateway.v1 import gateway_pb2 as gpb
from fresco.api.gateway.v1 import gateway_pb2_grpc as gpb_grpc
from fresco.experiments.evaluator import Assigned, Evaluator
from fresco.suite import ServiceProcess
from gateway.experiment_watch import save_config
from gateway.route_watch import save_table
from tests.integration import features_of
from tests.integration.test_tracing import Receiver
from tests.model_manager.gateway_world import (
    MODEL,
    Predictors,
    closed_port,
    metric,
    probabilities,
    start_predictors,
    table,
    version,
)

pytestmark = pytest.mark.integration
UNITS = [f"user-{i}" for i in range(60)]
NAMESPACE = "ns-fraud"


def arm(name: str, model_version: int, weight: float = 0.5) -> xpb.Arm:
    return xpb.Arm(name=name, weight=weight, model_version=model_version)


def config() -> apb.AssignmentConfig:
    """Two experiments splitting the model's units by namespace: versions 1 and 2 in "ab"; in "down", a version
    whose only replica is down (the route falls back to 1) and a version the route does not have."""

    def experiment(key: str, start: int, end: int, *arms: xpb.Arm) -> apb.ExperimentConfig:
        return apb.ExperimentConfig(
            key=key, version=3, phase=2, type=xpb.EXPERIMENT_TYPE_AB_TEST, model_name=MODEL, unit_type="user_id",
            salt=key, coverage=1.0, namespace=xpb.Namespace(id=NAMESPACE, start=start, end=end), arms=arms,
        )  # fmt: skip

    return apb.AssignmentConfig(
        revision=4,
        experiments=[
            experiment("ab", 0, 5000, arm("control", 1), arm("treatment", 2)),
            experiment("down", 5000, 10_000, arm("broken", 3), arm("missing", 4)),
        ],
    )


def expected(unit: str) -> Assigned:
    (assigned,) = [a for a in Evaluator(config()).assign({"user_id": unit}, {}, MODEL) if a.assigned]
    return assigned


def prepare_state(state: Path, predictors: Predictors) -> None:
    """The route table and the configuration a gateway kept from its last run."""
    live = predictors.endpoint
    routes = table(1, version("1", 100, live), version("2", 0, live), version("3", 0, closed_port()), fallback="1")
    save_table(state, routes)
    save_config(state, Evaluator(config()))


async def start_gateway(state: Path, *args: str, env: dict[str, str] | None = None) -> ServiceProcess:
    """A gateway whose model manager and experiment service are both down."""
    process = ServiceProcess(
        "gateway",
        [
            "--port", "0", "--metrics-port", "0", "--state-dir", str(state), "--gateway-id", "gw-arms",
            "--model-manager-address", closed_port().address, "--experiment-service", closed_port().address,
            "--route-backoff-max-s", "0.5", *args,
        ],
        env=env or {},
    )  # fmt: skip
    await asyncio.to_thread(process.start)
    try:
        await asyncio.to_thread(process.wait_healthy)
    except BaseException:
        await asyncio.to_thread(process.stop)
        raise
    return process


@pytest.fixture(scope="module")
def predictors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Predictors]:
    yield from start_predictors(tmp_path_factory.mktemp("arm-models"))


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    collector = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    collector.endpoint = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    try:
        yield collector
    finally:
        server.stop(0).wait()


class Gateway:
    """A gateway process and a stub to it."""

    def __init__(self, process: ServiceProcess) -> None:
        self.process = process
        self.channel = aio.insecure_channel(process.address)
        self.stub = gpb_grpc.GatewayServiceStub(self.channel)

    async def predict(self, request: gpb.PredictRequest) -> gpb.PredictResponse:
        response: gpb.PredictResponse = await self.stub.Predict(request, timeout=30)
        return response

    async def close(self) -> None:
        await self.channel.close()
        await asyncio.to_thread(self.process.stop)


@pytest.fixture
async def gateway(predictors: Predictors, receiver: Receiver, tmp_path: Path) -> AsyncIterator[Gateway]:
    prepare_state(tmp_path / "state", predictors)
    env = {
        "FRESCO_GATEWAY_TRACING_EXPORTER": "otlp",
        "FRESCO_GATEWAY_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    running = Gateway(await start_gateway(tmp_path / "state", env=env))
    try:
        yield running
    finally:
        await running.close()


def server_spans(receiver: Receiver, trace_id: bytes, timeout_s: float = 30.0) -> trace_pb2.Span:
    """The gateway's server span of one trace, once exported."""
    deadline = time.monotonic() + timeout_s
    while True:
        for exported in receiver.spans():
            span = exported.span
            if span.trace_id == trace_id and span.kind == trace_pb2.Span.SpanKind.SPAN_KIND_SERVER:
                return span
        assert time.monotonic() < deadline, "the gateway's span did not arrive"
        time.sleep(0.05)


def ask(predictors: Predictors, unit: str, **fields: object) -> gpb.PredictRequest:
    row = predictors.rows()[int(unit.rsplit("-", 1)[1]) % 16]
    return gpb.PredictRequest(model=MODEL, features=features_of(row), unit_ids={"user_id": unit}, **fields)  # type: ignore[arg-type]


def check(predictors: Predictors, unit: str, response: gpb.PredictResponse) -> str:
    """The answer a unit must get for its arm; returns the arm."""
    a = expected(unit)
    exposed = a.experiment_key == "ab"
    served = str(a.model_version) if exposed else "1"
    assert (response.model_version, response.fallback) == (served, a.arm_name == "broken"), unit
    assert response.experiment_arm == a.arm_name
    assert list(response.experiments) == [
        gpb.ExperimentArm(experiment_key=a.experiment_key, phase=2, arm=a.arm_name, exposed=exposed)
    ]
    row = predictors.rows()[int(unit.rsplit("-", 1)[1]) % 16]
    want = predictors.references[served].predict(row[None])["probabilities"][0]
    np.testing.assert_allclose(probabilities(response), want, rtol=1e-5)
    return a.arm_name


async def test_arms_route_to_their_versions_and_only_answered_arms_are_exposed(
    gateway: Gateway, predictors: Predictors
) -> None:
    arms = [check(predictors, unit, await gateway.predict(ask(predictors, unit))) for unit in UNITS]
    assert set(arms) == {"control", "treatment", "broken", "missing"}, "every case is met by the units"
    exposed = sum(expected(u).experiment_key == "ab" for u in UNITS)
    # The experiment service is down: the exposures wait in the queue, once per unit.
    assert metric(gateway.process, "fresco_gateway_exposures_queued") == exposed
    assert metric(gateway.process, "fresco_gateway_experiment_unroutable_total", {"experiment": "down"}) == sum(
        expected(u).arm_name == "missing" for u in UNITS
    )
    assert metric(gateway.process, "fresco_gateway_experiment_config_revision") == 4

    # A batch answers each request for its own arm.
    batch = [ask(predictors, unit) for unit in UNITS[:12]]
    answers = await gateway.stub.PredictBatch(gpb.PredictBatchRequest(requests=batch), timeout=30)
    assert [check(predictors, u, r) for u, r in zip(UNITS[:12], answers.responses, strict=True)] == arms[:12]


async def test_a_pinned_version_or_a_request_without_the_unit_type_is_in_no_experiment(
    gateway: Gateway, predictors: Predictors
) -> None:
    treated = next(u for u in UNITS if expected(u).arm_name == "treatment")
    pinned = await gateway.predict(ask(predictors, treated, version="1"))
    assert (pinned.model_version, pinned.experiment_arm, list(pinned.experiments)) == ("1", "", [])
    for request in (
        gpb.PredictRequest(model=MODEL, features=features_of(predictors.rows()[0]), unit_id=treated),
        gpb.PredictRequest(model=MODEL, features=features_of(predictors.rows()[0]), unit_ids={"session": treated}),
    ):
        answer = await gateway.predict(request)
        assert (answer.model_version, list(answer.experiments)) == ("1", [])
    assert metric(gateway.process, "fresco_gateway_exposures_queued") == 0


async def test_the_trace_carries_the_arm(gateway: Gateway, predictors: Predictors, receiver: Receiver) -> None:
    treated = next(u for u in UNITS if expected(u).arm_name == "treatment")
    missing = next(u for u in UNITS if expected(u).arm_name == "missing")
    spans = {}
    for unit in (treated, missing):
        response = await gateway.predict(ask(predictors, unit))
        trace_id = bytes.fromhex(response.trace_id)
        spans[unit] = await asyncio.to_thread(server_spans, receiver, trace_id)

    def attributes(span: trace_pb2.Span) -> dict[str, object]:
        return {a.key: getattr(a.value, a.value.WhichOneof("value") or "string_value") for a in span.attributes}

    treated_span = attributes(spans[treated])
    assert treated_span["fresco.experiment.key"] == "ab"
    assert treated_span["fresco.experiment.arm"] == "treatment"
    assert treated_span["fresco.experiment.phase"] == 2
    assert treated_span["fresco.experiment.exposed"] is True
    assert attributes(spans[missing])["fresco.experiment.exposed"] is False
    [event] = [e for e in spans[treated].events if e.name == "fresco.experiment"]
    assert {a.key: a.value.string_value for a in event.attributes}["fresco.experiment.arm"] == "treatment"


async def test_a_full_exposure_queue_drops_and_counts(predictors: Predictors, tmp_path: Path) -> None:
    prepare_state(tmp_path / "state", predictors)
    running = Gateway(await start_gateway(tmp_path / "state", "--exposure-queue", "5"))
    try:
        exposed_units = [u for u in UNITS if expected(u).experiment_key == "ab"]
        for unit in exposed_units:
            assert (await running.predict(ask(predictors, unit))).experiments[0].exposed
        dropped = len(exposed_units) - 5
        assert metric(running.process, "fresco_gateway_exposures_queued") == 5
        assert metric(running.process, "fresco_gateway_exposures_dropped_total", {"reason": "queue_full"}) == dropped
        # A queued unit is not queued again; a dropped one is offered again, and dropped again.
        await running.predict(ask(predictors, exposed_units[0]))
        await running.predict(ask(predictors, exposed_units[-1]))
        assert metric(running.process, "fresco_gateway_exposures_queued") == 5
        want = dropped + 1
        assert metric(running.process, "fresco_gateway_exposures_dropped_total", {"reason": "queue_full"}) == want
    finally:
        await running.close()


def test_units_split_over_both_experiments() -> None:
    """The namespace halves exclude each other: every unit is in exactly one experiment."""
    keys = [expected(u).experiment_key for u in UNITS]
    assert set(keys) == {"ab", "down"}
