"""Wiring of the predictor: the model store behind the inference servicer, on the chassis."""

from __future__ import annotations

import asyncio
import logging
import sys
from concurrent.futures import ThreadPoolExecutor

from chassis.errors import FrescoError
from chassis.server import ServiceApp, run, serve
from fresco.api.inference import grpc_service_pb2 as pb
from fresco.api.inference import grpc_service_pb2_grpc as pb_grpc
from predictor.backends.base import BackendOptions
from predictor.gpu_metrics import register_gpu_metrics
from predictor.http_server import HttpServer, build_application
from predictor.metrics import PredictorMetrics
from predictor.models import ModelStore
from predictor.peers import Peers
from predictor.poller import RepositoryPoller
from predictor.registration import Registration, advertised_address
from predictor.repository import ModelRepository
from predictor.service import METHOD_ROLES, InferenceServicer
from predictor.settings import PredictorSettings
from predictor.worker_plan import socket_path

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class Predictor:
    """A built predictor: its server, its model store and its servicer."""

    def __init__(self, settings: PredictorSettings) -> None:
        self.settings = settings
        self.app = ServiceApp("predictor", settings, [SERVICE_NAME], method_roles=METHOD_ROLES)
        self.executor = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="infer")
        self.store = ModelStore(
            ModelRepository(settings.model_repository),
            self.executor,
            BackendOptions(
                onnx_intra_op_threads=settings.onnx_intra_op_threads,
                engine_cache_dir=settings.trt_engine_cache_dir,
                shared_weights_min_bytes=settings.shared_weights_min_bytes,
                shared_weights_dir=settings.shared_weights_dir,
                inline_below_us=settings.inline_below_us,
            ),
            metrics=PredictorMetrics(self.app.registry),
            # Queue and compute spans only when spans go somewhere: they cost as much as the model here.
            tracer=self.app.tracer if settings.tracing_exporter != "none" else None,
        )
        if settings.worker_index is None:  # workers: the parent's merged /metrics exports the GPUs once
            register_gpu_metrics(self.app.registry)
        self.peers: Peers | None = None
        if settings.peers_dir is not None and settings.worker_index is not None:
            # A worker of --workers N: siblings reach it on its own unix socket.
            self.app.server.add_insecure_port(f"unix:{socket_path(settings.peers_dir, settings.worker_index)}")
            self.peers = Peers(settings.peers_dir, settings.worker_index, self.app.client_channel)
        # One thread decodes large requests, so they neither stall the event loop nor take inference threads.
        self.codec_executor = ThreadPoolExecutor(1, thread_name_prefix="codec")
        self.servicer = InferenceServicer(
            self.store,
            self.peers,
            control_mode=settings.model_control_mode,
            max_bytes_elements=settings.max_bytes_elements,
            codec_executor=self.codec_executor,
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, self.app.server)
        # The same servicer over HTTP (KServe v2 REST), started with `start_http`.
        self.http: HttpServer | None = None
        self._http_stopping: asyncio.Task[None] | None = None
        if settings.http_port >= 0:
            self.http = HttpServer(build_application(settings, self.app, self.servicer, self.codec_executor), settings)
            self.app.on_drain(self._drain_http)
        self._poller: asyncio.Task[None] | None = None
        self.registration: Registration | None = None
        self._registration_task: asyncio.Task[None] | None = None
        # One member per predictor: with --workers N, the first worker speaks for all (they serve alike).
        if settings.model_manager_address and not settings.worker_index:
            self.registration = self._registration()
        self.app.on_stop(self._close)
        # Registered after _close, so it runs before it (on_stop runs newest first): HTTP calls in
        # flight finish (within the grace period, beside gRPC's) before the store closes.
        self.app.on_stop(self._await_http)

    async def start_http(self) -> None:
        """Serve HTTP (when on); the announce line then carries its address."""
        if self.http is not None:
            await self.http.start()
            self.app.endpoints["http"] = self.http.url

    async def _drain_http(self) -> None:
        if self.http is not None and self.http.port:
            self._http_stopping = asyncio.get_running_loop().create_task(self.http.stop(), name="http-drain")

    async def _await_http(self) -> None:
        if self._http_stopping is not None:
            await self._http_stopping

    def _registration(self) -> Registration:
        settings = self.settings
        channel = self.app.client_channel(settings.model_manager_address, settings.model_manager_token_file)
        address = advertised_address(settings, self.app.port)
        return Registration(settings, self.store, lambda: self.servicer.started, channel, address)

    def start_registration(self) -> None:
        """Join the model manager's fleet in the background (when an address is set)."""
        if self.registration is not None and self._registration_task is None:
            self._registration_task = asyncio.get_running_loop().create_task(
                self.registration.run(), name="registration"
            )

    async def load_models(self) -> None:
        """Load the start-up models; the predictor turns SERVING once each is warm or has failed
        (failed ones stay UNAVAILABLE with their reason, and ServerReady stays false)."""
        settings = self.settings
        self.start_registration()  # reports unhealthy until the start-up models are loaded
        serving = await self.peers.served_models() if settings.sync_from_peers and self.peers else None
        if serving is not None:
            await asyncio.gather(*(self._load_named(name) for name in serving))
        elif settings.model_control_mode == "explicit" and "*" not in settings.load_model:
            await asyncio.gather(*(self._load_named(name) for name in settings.load_model))
        else:
            await self.store.load_all()
        self.servicer.started = True
        for model in self.store.models.values():
            if model.reason:
                log.warning("model %s is UNAVAILABLE: %s", model.name, model.reason)
        if settings.model_control_mode == "poll":
            poller = RepositoryPoller(self.store, settings.repository_poll_s)
            poller.remember()
            self._poller = asyncio.get_running_loop().create_task(poller.run(), name="repository-poller")

    async def _load_named(self, name: str) -> None:
        try:
            await self.store.load(name)
        except FrescoError as err:  # a name that is not in the repository must not keep the rest from serving
            log.error("model %s cannot be loaded: %s", name, err)

    async def _close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        if self._registration_task is not None:
            self._registration_task.cancel()
            await asyncio.gather(self._registration_task, return_exceptions=True)
        if self.registration is not None:
            await self.registration.channel.close()
        if self.peers is not None:
            await self.peers.close()
        await self.store.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.codec_executor.shutdown(wait=False, cancel_futures=True)


def build_server(settings: PredictorSettings) -> Predictor:
    """The predictor, bound (port 0 picks a free port) but not started."""
    return Predictor(settings)


async def serve_predictor(settings: PredictorSettings) -> None:
    """Build the predictor, load its models and serve until SIGTERM or SIGINT."""
    sys.setswitchinterval(settings.gil_switch_interval_us / 1e6)
    predictor = build_server(settings)
    await predictor.start_http()
    await serve(predictor.app, ready=predictor.load_models)


def run_predictor(settings: PredictorSettings) -> None:
    """One predictor process (alone, or one worker of `--workers N`) on uvloop, until it stops."""
    run(serve_predictor(settings))
