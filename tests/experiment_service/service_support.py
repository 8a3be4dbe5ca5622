"""Running the experiment service as a process for tests, and experiments to feed it."""

from __future__ import annotations

import queue
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import grpc

from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.api.experiments.v1 import experiment_service_pb2 as pb
from fresco.api.experiments.v1 import experiment_service_pb2_grpc as pb_grpc
from fresco.suite import ServiceProcess


def service_args(state_dir: Path, *extra: str) -> list[str]:
    """Flags of a test's experiment service: its state dir, a free port, no metrics endpoint."""
    return ["--state-dir", str(state_dir), "--port", "0", "--metrics-port", "-1", "--log-format", "text", *extra]


@contextmanager
def running(state_dir: Path, *extra: str) -> Iterator[ServiceProcess]:
    """The service, healthy; stopped cleanly (exit code 0) at the end."""
    process = ServiceProcess("experiment_service", service_args(state_dir, *extra)).start()
    try:
        process.wait_healthy(60)
        yield process
    finally:
        assert process.stop() == 0, process.output()


@contextmanager
def stub_for(process: ServiceProcess) -> Iterator[pb_grpc.ExperimentServiceStub]:
    """A stub on an insecure channel to the service."""
    with grpc.insecure_channel(process.address) as channel:
        yield pb_grpc.ExperimentServiceStub(channel)


def experiment(
    key: str,
    weights: Sequence[float] = (0.5, 0.5),
    *,
    kind: int = xpb.EXPERIMENT_TYPE_AB_TEST,
    **fields: object,
) -> xpb.Experiment:
    """A valid experiment on model "m" with one arm per weight (arm i on version i + 1) and one proportion metric."""
    values: dict[str, object] = {
        "key": key,
        "hypothesis": "the treatment converts better",
        "type": kind,
        "model_name": "m",
        "unit_type": "user_id",
        "coverage": 1.0,
        "arms": [xpb.Arm(name=f"arm{i}", weight=w, model_version=i + 1) for i, w in enumerate(weights)],
        "metrics": [
            xpb.MetricSpec(
                name="conversion", kind=xpb.METRIC_KIND_PROPORTION, role=xpb.METRIC_ROLE_SUCCESS,
                minimum_detectable_effect=0.02,
            )
        ],
    }  # fmt: skip
    return xpb.Experiment(**{**values, **fields})  # type: ignore[arg-type]


def create_and_start(stub: pb_grpc.ExperimentServiceStub, e: xpb.Experiment) -> xpb.Experiment:
    """Create `e` and start it; the running experiment."""
    created = stub.CreateExperiment(pb.CreateExperimentRequest(experiment=e)).experiment
    started = stub.StartExperiment(pb.StartExperimentRequest(key=created.key, expected_version=created.version))
    return started.experiment


class Gateway:
    """One WatchExperiments stream as a gateway drives it: requests queued, responses read one at a time (the
    call's deadline bounds every read)."""

    def __init__(self, stub: pb_grpc.ExperimentServiceStub, gateway_id: str = "", resume: int = 0) -> None:
        self.requests: queue.Queue[pb.WatchExperimentsRequest | None] = queue.Queue()
        if gateway_id:
            subscription = apb.ConfigSubscription(gateway_id=gateway_id, resume_from_revision=resume)
            self.requests.put(pb.WatchExperimentsRequest(subscribe=subscription))

        def requests() -> Iterator[pb.WatchExperimentsRequest]:
            while (request := self.requests.get()) is not None:
                yield request

        self.call = stub.WatchExperiments(requests(), timeout=60)

    def next(self) -> pb.WatchExperimentsResponse:
        response: pb.WatchExperimentsResponse = next(self.call)
        return response

    def ack(self, revision: int, accepted: bool = True, error: str = "") -> None:
        self.requests.put(
            pb.WatchExperimentsRequest(ack=apb.ConfigAck(revision=revision, accepted=accepted, error=error))
        )

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()
