"""A real gateway following the real experiment service's WatchExperiments, in front of a real predictor serving
versions 1 and 2 (the model manager down: the route table comes from the gateway's state directory). The gateway
assigns what the service's Assign answers, follows experiments started and stopped, keeps assigning from its last
configuration while the service is down (also after its own restart), and its queued exposures wait for the
service to come back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from grpc import aio
from prometheus_client import CollectorRegistry

from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.api.experiments.v1 import experiment_service_pb2 as pb
from fresco.api.experiments.v1 import experiment_service_pb2_grpc as pb_grpc
from fresco.api.gateway.v1 import gateway_pb2 as gpb
from fresco.api.gateway.v1 import gateway_pb2_grpc as gpb_grpc
from fresco.experiments.evaluator import Evaluator
from fresco.suite import ServiceProcess, issue_local_tokens, start_platform
from gateway.experiment_watch import ExperimentWatcher
from gateway.route_watch import save_table
from tests.experiment_service.service_support import experiment, service_args
from tests.integration import features_of
from tests.model_manager.gateway_world import MODEL, Predictors, closed_port, metric, start_predictors, table, version

pytestmark = pytest.mark.integration
UNITS = [f"user-{i}" for i in range(40)]
WAIT_S = 60.0
APPLIED = "fresco_gateway_experiment_config_messages_applied_total"


async def started(process: ServiceProcess) -> ServiceProcess:
    await asyncio.to_thread(process.start)
    try:
        await asyncio.to_thread(process.wait_healthy)
    except BaseException:
        await asyncio.to_thread(process.stop)
        raise
    return process


def start_service(state: Path, port: int = 0) -> Awaitable[ServiceProcess]:
    args = service_args(state)
    args[args.index("--port") + 1] = str(port)
    return started(ServiceProcess("experiment_service", args))


def port_of(process: ServiceProcess) -> int:
    return int(process.address.rsplit(":", 1)[1])


class Service:
    """The experiment service process and an asyncio stub to it."""

    def __init__(self, process: ServiceProcess) -> None:
        self.process = process
        self.channel = aio.insecure_channel(process.address)
        self.stub: pb_grpc.ExperimentServiceAsyncStub = pb_grpc.ExperimentServiceStub(self.channel)

    async def start(self, e: xpb.Experiment) -> xpb.Experiment:
        created = (await self.stub.CreateExperiment(pb.CreateExperimentRequest(experiment=e), timeout=30)).experiment
        request = pb.StartExperimentRequest(key=created.key, expected_version=created.version)
        return (await self.stub.StartExperiment(request, timeout=30)).experiment

    async def assign(self, units: list[str]) -> list[apb.Assignment]:
        request = pb.AssignRequest(units=[apb.AssignmentUnit(unit_ids={"user_id": u}) for u in units], model_name=MODEL)
        response = await self.stub.Assign(request, timeout=30)
        return [next((a for a in u.assignments if a.arm_name), apb.Assignment()) for u in response.units]

    async def close(self) -> None:
        await self.channel.close()
        await asyncio.to_thread(self.process.stop)


class Gateway:
    """A gateway process and a stub to it."""

    def __init__(self, process: ServiceProcess, predictors: Predictors) -> None:
        self.process = process
        self.predictors = predictors
        self.channel = aio.insecure_channel(process.address)
        self.stub = gpb_grpc.GatewayServiceStub(self.channel)

    async def predict(self, unit: str) -> gpb.PredictResponse:
        row = self.predictors.rows()[0]
        request = gpb.PredictRequest(model=MODEL, features=features_of(row), unit_ids={"user_id": unit})
        response: gpb.PredictResponse = await self.stub.Predict(request, timeout=30)
        return response

    async def arms(self, units: list[str]) -> list[tuple[str, str]]:
        """(arm, version that answered) per unit; arm "" when in no experiment."""
        return [(r.experiment_arm, r.model_version) for r in [await self.predict(u) for u in units]]

    def metric(self, name: str) -> float | None:
        return metric(self.process, name)

    async def close(self) -> None:
        await self.channel.close()
        await asyncio.to_thread(self.process.stop)


def start_gateway(state: Path, service: str, predictors: Predictors) -> Awaitable[Gateway]:
    async def start() -> Gateway:
        process = ServiceProcess(
            "gateway",
            [
                "--port", "0", "--metrics-port", "0", "--state-dir", str(state), "--gateway-id", "gw-exp",
                "--model-manager-address", closed_port().address, "--experiment-service", service,
                "--route-backoff-max-s", "0.3",
            ],
        )  # fmt: skip
        return Gateway(await started(process), predictors)

    return start()


async def eventually(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll an async condition with a deadline generous for a loaded machine."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not await condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def predictors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Predictors]:
    yield from start_predictors(tmp_path_factory.mktemp("service-models"))


@pytest.fixture
def gateway_state(predictors: Predictors, tmp_path: Path) -> Path:
    """Versions 1 (all the traffic) and 2 (weight 0, for experiment arms) routed, the manager down."""
    state = tmp_path / "gateway"
    live = predictors.endpoint
    save_table(state, table(1, version("1", 100, live), version("2", 0, live)))
    return state


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    running = Service(await start_service(tmp_path / "service"))
    try:
        yield running
    finally:
        await running.close()


def ab(key: str) -> xpb.Experiment:
    return experiment(key, model_name=MODEL, salt=key)


async def test_the_gateway_follows_experiments_started_and_stopped(
    service: Service, gateway_state: Path, predictors: Predictors
) -> None:
    gateway = await start_gateway(gateway_state, service.process.address, predictors)
    try:
        assert await gateway.arms(UNITS[:3]) == [("", "1")] * 3, "no experiment yet"
        running = await service.start(ab("exp-follow"))

        async def assigned() -> bool:
            return (await gateway.predict(UNITS[0])).experiment_arm != ""

        await eventually(assigned, "the gateway to assign the started experiment")
        # The same arms as the service's Assign, each answered by its arm's version.
        expected = await service.assign(UNITS)
        versions = {a.name: str(a.model_version) for a in running.arms}
        assert await gateway.arms(UNITS) == [(a.arm_name, versions[a.arm_name]) for a in expected]
        assert {a.arm_name for a in expected} == set(versions), "both arms are met"
        answer = await gateway.predict(UNITS[0])
        assert (answer.experiments[0].experiment_key, answer.experiments[0].exposed) == ("exp-follow", True)

        stop = pb.StopExperimentRequest(key="exp-follow", expected_version=running.version, reason="test")
        await service.stub.StopExperiment(stop, timeout=30)

        async def unassigned() -> bool:
            return (await gateway.predict(UNITS[0])).experiment_arm == ""

        await eventually(unassigned, "the gateway to stop assigning")
        assert await gateway.arms(UNITS) == [("", "1")] * len(UNITS)
        assert gateway.metric("fresco_gateway_experiment_config_staleness_seconds") == 0
    finally:
        await gateway.close()


async def test_assignment_and_exposures_go_on_while_the_service_is_down_and_after_a_gateway_restart(
    tmp_path: Path, gateway_state: Path, predictors: Predictors
) -> None:
    service = Service(await start_service(tmp_path / "service"))
    port = port_of(service.process)
    gateway = await start_gateway(gateway_state, service.process.address, predictors)
    early, late = UNITS[:20], UNITS[20:]
    try:
        await service.start(ab("exp-outage"))

        async def assigned() -> bool:
            return (await gateway.predict(UNITS[0])).experiment_arm != ""

        await eventually(assigned, "the gateway to assign the started experiment")
        before = await gateway.arms(early)

        async def sent(count: int) -> bool:
            return gateway.metric("fresco_gateway_exposures_sent_total") == count

        await eventually(lambda: sent(len(early)), "the early units' exposures to be sent")
        await service.close()

        # The service is down: the same arms, from the configuration held; the late units' exposures wait.
        assert await gateway.arms(early) == before
        before += await gateway.arms(late)
        assert gateway.metric("fresco_gateway_exposures_queued") == len(late)
        await gateway.close()

        # A restarted gateway assigns from its state directory before the service answers, and queues again the late
        # units' exposures the old process kept there at its stop. It remembers no exposure sent, so every unit's
        # is queued again by its new request too.
        gateway = await start_gateway(gateway_state, f"127.0.0.1:{port}", predictors)
        assert gateway.metric("fresco_gateway_exposures_queued") == len(late)
        assert await gateway.arms(UNITS) == before
        assert (gateway.metric("fresco_gateway_experiment_config_staleness_seconds") or 0) > 0
        assert gateway.metric("fresco_gateway_exposures_queued") == len(late) + len(UNITS)

        # The service comes back on its port: the stream resumes and the queue is sent; every exposure sent twice
        # (the early units', and the late units' kept and queued again) is counted once.
        service = Service(await start_service(tmp_path / "service", port))

        async def current() -> bool:
            return gateway.metric("fresco_gateway_experiment_config_staleness_seconds") == 0

        await eventually(current, "the gateway to resume the configuration stream")
        await eventually(lambda: sent(len(late) + len(UNITS)), "the queued exposures to be sent")
        assert gateway.metric("fresco_gateway_exposures_queued") == 0
        assert gateway.metric("fresco_gateway_exposures_duplicates_total") == len(early) + len(late)
        results = await service.stub.GetResults(pb.GetResultsRequest(key="exp-outage"), timeout=30)
        units = {arm.arm_name: arm.units for arm in results.results.arms}
        assert units == {name: sum(arm == name for arm, _ in before) for name in units}
        assert sum(units.values()) == len(UNITS)
        assert await gateway.arms(UNITS) == before
    finally:
        await gateway.close()
        await service.close()


async def test_an_update_on_another_revision_is_rejected_and_the_watcher_resubscribes(service: Service) -> None:
    """The watcher in this process against the real service: after refusing an update based on a revision it does
    not hold, it subscribes again from the revision it holds and gets the configuration whole."""
    registry = CollectorRegistry()
    watcher = ExperimentWatcher(aio.insecure_channel, service.process.address, "gw-resync", None, registry)
    watcher.start()
    try:
        await service.start(ab("exp-one"))

        async def at(revision: int) -> bool:
            return watcher.evaluator is not None and watcher.evaluator.revision == revision

        await eventually(lambda: at(1), "the first snapshot")
        # The held configuration diverges from what the service sent (as after a lost message).
        watcher.current = Evaluator(apb.AssignmentConfig())
        await service.start(ab("exp-two"))
        await eventually(lambda: at(2), "the configuration after the resubscription")
        assert watcher.evaluator is not None
        assert watcher.evaluator.keys() == ["exp-one", "exp-two"]
        [(revision, error)] = watcher.rejected
        assert revision == 2
        assert "update.base_revision: expected the held revision 0, got 1" in error
        kinds = {kind: registry.get_sample_value(APPLIED, {"kind": kind}) for kind in ("snapshot", "update")}
        assert kinds == {"snapshot": 2, "update": 0}, "the first snapshot, then one after the resubscription"
    finally:
        await watcher.close()


async def test_the_platforms_gateway_watches_the_experiment_service_with_auth_on(tmp_path: Path) -> None:
    auth = issue_local_tokens(tmp_path / "auth")
    suite = await asyncio.to_thread(start_platform, tmp_path, auth, None, 1.0, True)
    try:
        gateway = suite.service("gateway")
        service = suite.service("experiment_service")
        with auth.admin.channel(service.address) as channel:
            stub = pb_grpc.ExperimentServiceStub(channel)
            admin = auth.admin.metadata()
            # Parameter arms: the platform's manager has no model whose versions an arm could hold.
            params = ab("exp-auth")
            params.model_name = ""
            for arm in params.arms:
                arm.model_version = 0
                arm.parameters["ranker"] = arm.name
            created = stub.CreateExperiment(pb.CreateExperimentRequest(experiment=params), metadata=admin)
            start = pb.StartExperimentRequest(key="exp-auth", expected_version=created.experiment.version)
            await asyncio.to_thread(stub.StartExperiment, start, metadata=admin)

        async def watched() -> bool:
            return metric(gateway, "fresco_gateway_experiment_config_revision") == 1

        await eventually(watched, "the platform's gateway to apply the configuration")
        assert metric(gateway, "fresco_gateway_experiment_config_staleness_seconds") == 0
    finally:
        await asyncio.to_thread(suite.stop)
