"""Inference-protocol helpers shared by the benchmark and its floor server: Triton's model config for the
benchmark model (perf_analyzer reads it at start), and a small blocking client."""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.predictor.spec import FEATURES, INPUT_NAME, MODEL_NAME, OUTPUT_NAME
from fresco.api.inference import grpc_service_pb2 as pb
from fresco.api.inference import grpc_service_pb2_grpc as pb_grpc
from fresco.api.inference import model_config_pb2 as mc

MAX_BATCH_SIZE = 64
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def model_config_response(output_name: str = OUTPUT_NAME, platform: str = "onnxruntime_onnx") -> pb.ModelConfigResponse:
    """Triton's view of the MLP: batching model (max_batch_size 64), input [32] FP32, output [1] FP32."""
    config = mc.ModelConfig(name=MODEL_NAME, platform=platform, max_batch_size=MAX_BATCH_SIZE)
    config.input.add(name=INPUT_NAME, data_type=mc.TYPE_FP32, dims=[FEATURES])
    config.output.add(name=output_name, data_type=mc.TYPE_FP32, dims=[1])
    return pb.ModelConfigResponse(config=config)


@dataclass(frozen=True)
class ReadyCheck:
    """What a readiness probe saw."""

    ready: bool
    detail: str


def probe_ready(address: str, model: str, health: bool, timeout_s: float = 2.0) -> ReadyCheck:
    """One probe on a fresh channel: ModelReady (and the gRPC health check when `health`)."""
    # A distinct channel argument keeps grpc from reusing a pooled connection: every probe is a new
    # TCP connection, so with SO_REUSEPORT successive probes reach different worker processes.
    options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(address, options=options) as channel:
        try:
            if health:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
                )
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                    return ReadyCheck(False, f"health {status}")
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            ready = stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=timeout_s).ready
            return ReadyCheck(ready, "ready" if ready else f"model {model} not ready")
        except grpc.RpcError as err:
            return ReadyCheck(False, f"{err.code().name}: {err.details()}")


def model_config(address: str, model: str, timeout_s: float = 5.0) -> pb.ModelConfigResponse:
    """The server's answer to Triton's ModelConfig rpc (raises grpc.RpcError if it has none)."""
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        response: pb.ModelConfigResponse = stub.ModelConfig(pb.ModelConfigRequest(name=model), timeout=timeout_s)
        return response


def infer_rows(address: str, model: str, rows: np.ndarray, output: str, timeout_s: float = 10.0) -> np.ndarray:
    """Send `rows` (float32 [n, 32]) as one request; the named output as float64 [n]."""
    request = pb.ModelInferRequest(model_name=model, id="bench-check")
    request.inputs.add(name=INPUT_NAME, datatype="FP32", shape=list(rows.shape))
    request.outputs.add(name=output)
    request.raw_input_contents.append(np.ascontiguousarray(rows, dtype=np.float32).tobytes())
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        response: pb.ModelInferResponse = stub.ModelInfer(request, timeout=timeout_s)
    for index, tensor in enumerate(response.outputs):
        if tensor.name != output:
            continue
        dtype = {"FP32": np.float32, "FP64": np.float64}.get(tensor.datatype)
        if dtype is None:
            raise ValueError(f"output {output}: unexpected datatype {tensor.datatype}")
        if response.raw_output_contents:
            values = np.frombuffer(response.raw_output_contents[index], dtype=dtype)
        else:
            field = "fp32_contents" if tensor.datatype == "FP32" else "fp64_contents"
            values = np.asarray(getattr(tensor.contents, field), dtype=dtype)
        return values.astype(np.float64).reshape(-1)
    raise ValueError(f"the response has no output {output!r}: {[t.name for t in response.outputs]}")


def load_model(address: str, model: str, timeout_s: float = 120.0) -> float:
    """RepositoryModelLoad; the seconds until it returned."""
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        start = time.perf_counter()
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=model), timeout=timeout_s)
        return time.perf_counter() - start


def unload_model(address: str, model: str, timeout_s: float = 60.0) -> None:
    """RepositoryModelUnload."""
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=model), timeout=timeout_s)


def answered(address: str, model: str, timeout_s: float = 10.0) -> int:
    """Requests a Fresco predictor has answered successfully for `model`, by ModelStatistics (every
    worker's, as the predictor merges them)."""
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=timeout_s)
    return sum(stats.inference_stats.success.count for stats in response.model_stats)
