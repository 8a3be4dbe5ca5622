"""Membership in the model manager's fleet: register, then heartbeat health, memory and loaded models (with
request rates from the predictor's own counters); register again when the manager forgot us; back off while it
is down. Runs beside serving as one small task and never holds up inference."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import re
import socket
import time
import uuid
from collections.abc import Callable

import grpc
from grpc import aio

from fresco.api.models.v1 import fleet_pb2 as fpb
from fresco.api.models.v1 import model_manager_service_pb2 as mpb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as mpb_grpc
from predictor.models import ModelStore, State
from predictor.settings import PredictorSettings

log = logging.getLogger(__name__)

# The config parameters the model manager's loader writes (model_manager.loader), naming the registry version.
MODEL_PARAMETER = "registry_model"
VERSION_PARAMETER = "registry_version"
RPC_TIMEOUT_S = 5.0
MIN_BACKOFF_S = 0.2
MAX_BACKOFF_S = 5.0
DEFAULT_INTERVAL_S = 2.0
_ID_CHARACTER = re.compile(r"[^A-Za-z0-9._:-]")


def advertised_address(settings: PredictorSettings, port: int) -> str:
    """The IP:port the manager and gateways reach this predictor at."""
    if settings.advertise_address:
        return settings.advertise_address
    host = settings.host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = ipaddress.ip_address(socket.gethostbyname(host))
    if ip.is_unspecified:
        raise ValueError(f"advertise_address: required with model_manager_address when host is {host!r}")
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def default_predictor_id(port: int) -> str:
    """<hostname>-<port>: stable across restarts of the same replica on the same port."""
    return _ID_CHARACTER.sub("-", f"{socket.gethostname()}-{port}")[:128]


def physical_memory() -> int:
    """The machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class Registration:
    """Keeps this predictor registered with the model manager for as long as it runs."""

    def __init__(
        self,
        settings: PredictorSettings,
        store: ModelStore,
        started: Callable[[], bool],
        channel: aio.Channel,
        address: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.started = started
        self.channel = channel
        self.stub = mpb_grpc.ModelManagerServiceStub(channel)
        self.clock = clock
        self.predictor_id = settings.predictor_id or default_predictor_id(int(address.rpartition(":")[2]))
        self.address = address
        self.zone = settings.zone
        self.labels = dict(settings.predictor_labels)
        self.capacity = settings.memory_capacity_bytes or physical_memory()
        self.boot_id = uuid.uuid4().hex
        self.registered = False
        self.interval_s = DEFAULT_INTERVAL_S
        # (model, version) -> (requests counted, when) at the last report, for request rates.
        self._counted: dict[tuple[str, int], tuple[int, float]] = {}
        self._jitter = random.Random(self.predictor_id)  # spreads retries of many predictors; not security

    def report(self) -> fpb.PredictorInfo:
        """This predictor now: health, memory, and every loaded version with its request rate since last time."""
        now = self.clock()
        loaded, used = [], 0
        counted: dict[tuple[str, int], tuple[int, float]] = {}
        for model in list(self.store.models.values()):
            parameters = model.config.parameters if model.config is not None else {}
            registry_model = parameters.get(MODEL_PARAMETER, "")
            registry_version = parameters.get(VERSION_PARAMETER, "")
            for number, version in sorted(model.versions.items()):
                ready = version.state is State.READY
                memory = version.session.memory_bytes() if version.session is not None and ready else 0
                used += memory
                requests = version.stats.success.count + version.stats.fail.count
                before, at = self._counted.get((model.name, number), (requests, now))
                counted[(model.name, number)] = (requests, now)
                rate = (requests - before) / (now - at) if now > at and requests >= before else 0.0
                loaded.append(
                    fpb.LoadedModel(
                        predictor_model_name=model.name,
                        model_name=registry_model if registry_version == str(number) else "",
                        version=number,
                        ready=ready,
                        memory_bytes=memory,
                        request_rate=rate,
                    )
                )
        self._counted = counted
        return fpb.PredictorInfo(
            predictor_id=self.predictor_id,
            address=self.address,
            labels=self.labels,
            zone=self.zone,
            boot_id=self.boot_id,
            healthy=self.started(),
            memory_capacity_bytes=self.capacity,
            memory_used_bytes=used,
            loaded_models=loaded,
        )

    async def run(self) -> None:
        """Register and heartbeat until cancelled."""
        backoff = MIN_BACKOFF_S
        failing = False
        while True:
            try:
                await self.step()
                if failing:
                    log.info("model manager reachable again")
                failing, backoff = False, MIN_BACKOFF_S
                if self.registered:
                    await asyncio.sleep(self.interval_s)
            except grpc.RpcError as err:
                if not failing:
                    log.warning(
                        "model manager call failed, retrying with backoff: %s %s",
                        err.code().name,
                        err.details(),
                    )
                failing = True
                await asyncio.sleep(backoff * (0.5 + self._jitter.random()))
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def step(self) -> None:
        """One register or heartbeat call."""
        if not self.registered:
            registered = await self.stub.RegisterPredictor(
                mpb.RegisterPredictorRequest(predictor=self.report()), timeout=RPC_TIMEOUT_S
            )
            self.registered = True
            self._take_interval(registered.heartbeat_interval.ToTimedelta().total_seconds())
            log.info("registered with the model manager as %s (%s)", self.predictor_id, self.address)
            return
        answer = await self.stub.PredictorHeartbeat(
            mpb.PredictorHeartbeatRequest(predictor=self.report()), timeout=RPC_TIMEOUT_S
        )
        if not answer.known:
            log.info("the model manager does not know this predictor (restarted or lease lost): registering again")
            self.registered = False
            return
        self._take_interval(answer.heartbeat_interval.ToTimedelta().total_seconds())

    def _take_interval(self, seconds: float) -> None:
        if seconds > 0:
            self.interval_s = seconds
