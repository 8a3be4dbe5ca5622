"""Wiring of the predictor: the model store behind the inference servicer, on the chassis."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from chassis.server import ServiceApp
from fresco.api.inference import grpc_service_pb2 as pb
from fresco.api.inference import grpc_service_pb2_grpc as pb_grpc
from predictor.backends.base import BackendOptions
from predictor.metrics import PredictorMetrics
from predictor.models import ModelStore
from predictor.repository import ModelRepository
from predictor.service import InferenceServicer
from predictor.settings import PredictorSettings

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class Predictor:
    """A built predictor: its server, its model store and its servicer."""

    def __init__(self, settings: PredictorSettings) -> None:
        self.settings = settings
        self.app = ServiceApp("predictor", settings, [SERVICE_NAME])
        self.executor = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="infer")
        self.store = ModelStore(
            ModelRepository(settings.model_repository),
            self.executor,
            BackendOptions(onnx_intra_op_threads=settings.onnx_intra_op_threads),
            metrics=PredictorMetrics(self.app.registry),
            tracer=self.app.tracer,
        )
        self.servicer = InferenceServicer(self.store)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, self.app.server)
        self.app.on_stop(self._close)

    async def load_models(self) -> None:
        """Load the repository; the predictor turns SERVING once every model is warm or has failed
        (failed ones stay UNAVAILABLE with their reason, and ServerReady stays false)."""
        await self.store.load_all()
        self.servicer.started = True
        for model in self.store.models.values():
            if model.reason:
                log.warning("model %s is UNAVAILABLE: %s", model.name, model.reason)

    async def _close(self) -> None:
        await self.store.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


def build_server(settings: PredictorSettings) -> Predictor:
    """The predictor, bound (port 0 picks a free port) but not started."""
    return Predictor(settings)
