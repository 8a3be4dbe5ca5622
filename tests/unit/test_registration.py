"""The predictor's side of the fleet: what it reports of itself, including the registry identity of versions the
manager loaded and request rates from its own counters."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from grpc import aio

from fresco.training import ExportedModel
from model_manager.loader import Artifact, load_request
from predictor.models import ModelStore
from predictor.overrides import parse_load_parameters
from predictor.registration import Registration, advertised_address, default_predictor_id
from predictor.repository import ModelRepository
from predictor.settings import PredictorSettings


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


async def test_the_report_names_registry_versions_and_measures_request_rates(
    repository: Path, executor: ThreadPoolExecutor, trained_model: ExportedModel
) -> None:
    store = ModelStore(ModelRepository(repository), executor)
    await store.load("demo")  # from the repository: no registry identity
    request = load_request("churn.v7", Artifact("churn", 7, trained_model.path.read_bytes(), 0, "", 0))
    await store.load("churn.v7", parse_load_parameters("churn.v7", request.parameters))
    clock = Clock()
    settings = PredictorSettings(predictor_id="p9", zone="zone-x", memory_capacity_bytes=5 << 30)
    channel = aio.insecure_channel("127.0.0.1:1")  # never called here
    registration = Registration(settings, store, lambda: True, channel, "127.0.0.1:7001", clock=clock)
    try:
        first = registration.report()
        assert (first.predictor_id, first.zone, first.address, first.healthy) == (
            "p9",
            "zone-x",
            "127.0.0.1:7001",
            True,
        )
        assert first.memory_capacity_bytes == 5 << 30
        by_name = {m.predictor_model_name: m for m in first.loaded_models}
        assert (by_name["churn.v7"].model_name, by_name["churn.v7"].version, by_name["churn.v7"].ready) == (
            "churn",
            7,
            True,
        )
        assert (by_name["demo"].model_name, by_name["demo"].version) == ("", 1)
        assert first.memory_used_bytes == sum(m.memory_bytes for m in first.loaded_models) > 0
        assert all(m.request_rate == 0.0 for m in first.loaded_models)
        version = store.get("churn.v7", "7")
        rows = {"X": np.asarray(trained_model.sample[:1], dtype=np.float32)}
        for _ in range(10):
            await store.infer(version, rows, ())
            version.record_request(True, 1000)
        clock.now += 2.0
        second = {m.predictor_model_name: m for m in registration.report().loaded_models}
        assert second["churn.v7"].request_rate == pytest.approx(5.0)
        assert second["demo"].request_rate == 0.0
        assert registration.report().boot_id == first.boot_id
    finally:
        await channel.close()
        await store.close()


def test_the_advertised_address_and_default_id() -> None:
    assert advertised_address(PredictorSettings(host="127.0.0.1"), 8001) == "127.0.0.1:8001"
    assert advertised_address(PredictorSettings(host="::1"), 8001) == "[::1]:8001"
    assert advertised_address(PredictorSettings(host="0.0.0.0", advertise_address="10.1.2.3:8001"), 1) == (
        "10.1.2.3:8001"
    )
    with pytest.raises(ValueError, match="advertise_address"):
        advertised_address(PredictorSettings(host="0.0.0.0"), 8001)
    assert default_predictor_id(8001).endswith("-8001")
