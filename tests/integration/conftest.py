"""Shared fixtures of the integration tests: a model repository with real trained models, the
reference answers of ONNX Runtime run in this process, and one predictor + gateway pair started as
real processes for the whole session. Tests that need a process of their own start it themselves."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc import aio

from fresco.api.gateway.v1 import gateway_pb2_grpc
from fresco.api.inference import grpc_service_pb2_grpc
from fresco.suite import ServiceProcess, Suite, start_suite
from fresco.training import ExportedModel, train_classifier
from tests.integration import CLIENT_OPTIONS, Reference, write_echo_model


@dataclass(frozen=True)
class Repository:
    """The session's model repository: the trained demo classifier and a string-echo model."""

    root: Path
    demo: ExportedModel


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    """Trained once per session; the services only read it."""
    root = tmp_path_factory.mktemp("models")
    demo = train_classifier(root, "demo", 1)
    write_echo_model(root)
    return Repository(root, demo)


@pytest.fixture(scope="session")
def reference(repository: Repository) -> Reference:
    return Reference(repository.demo)


@pytest.fixture(scope="session")
def sample(repository: Repository) -> np.ndarray:
    """Rows the demo model was trained on, float32 [256, 8]."""
    return repository.demo.sample


@pytest.fixture(scope="session")
def suite(repository: Repository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    """One healthy predictor + gateway pair, shared by the tests that only send requests."""
    running = start_suite(repository.root, log_dir=tmp_path_factory.mktemp("logs"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def predictor(suite: Suite) -> ServiceProcess:
    return suite.services[0]


@pytest.fixture(scope="session")
def gateway(suite: Suite) -> ServiceProcess:
    return suite.services[1]


@pytest.fixture(scope="session")
def predictor_stub(predictor: ServiceProcess) -> Iterator[grpc_service_pb2_grpc.GRPCInferenceServiceStub]:
    """A synchronous inference-protocol stub to the shared predictor."""
    with grpc.insecure_channel(predictor.address, options=CLIENT_OPTIONS) as channel:
        yield grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="session")
async def predictor_aio(predictor: ServiceProcess) -> AsyncIterator[grpc_service_pb2_grpc.GRPCInferenceServiceStub]:
    """An asyncio inference-protocol stub to the shared predictor."""
    async with aio.insecure_channel(predictor.address, options=CLIENT_OPTIONS) as channel:
        yield grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="session")
async def gateway_aio(gateway: ServiceProcess) -> AsyncIterator[gateway_pb2_grpc.GatewayServiceStub]:
    """An asyncio GatewayService stub to the shared gateway."""
    async with aio.insecure_channel(gateway.address, options=CLIENT_OPTIONS) as channel:
        yield gateway_pb2_grpc.GatewayServiceStub(channel)
