"""The floor: a do-nothing inference-protocol server on grpc.aio + uvloop that answers every ModelInfer
with one precomputed response, so no Python gRPC server can beat it on this machine.

    python -m bench.predictor.floor_server --port P [--workers N]

With `--workers N` it starts N processes that all bind the same port (grpc sets SO_REUSEPORT on Linux,
so the kernel spreads connections over them) and prints `floor listening on HOST:PORT workers=N`
once every one of them listens. It answers ServerLive, ServerReady, ModelReady, ServerMetadata,
ModelMetadata and ModelConfig too, which perf_analyzer calls before it starts loading.
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import numpy as np
from grpc import aio

from bench.predictor.protocol import CHANNEL_OPTIONS, model_config_response
from bench.predictor.spec import FEATURES, INPUT_NAME, MODEL_NAME, OUTPUT_NAME
from fresco.api.inference import grpc_service_pb2 as pb
from fresco.api.inference import grpc_service_pb2_grpc as pb_grpc

Context: TypeAlias = aio.ServicerContext[Any, Any]
WORKER_READY = "floor worker listening"


class RequestCounter:
    """ModelInfer calls this process answered, in an 8-byte file `<directory>/<pid>` that a benchmark
    sums over a server's processes (its CPU per request is CPU seconds over this count); a plain
    memory write per call."""

    def __init__(self, directory: Path | None) -> None:
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        if directory is not None:
            path = directory / str(os.getpid())
            path.write_bytes(bytes(8))
            with path.open("r+b") as handle:
                self._map = mmap.mmap(handle.fileno(), 8)
            self._view = memoryview(self._map).cast("Q")

    def add(self) -> None:
        if self._view is not None:
            self._view[0] += 1


def read_counts(directory: Path) -> int:
    """The calls counted by every process that wrote under `directory`."""
    return sum(int.from_bytes(path.read_bytes()[:8], "little") for path in directory.iterdir() if path.is_file())


class FloorServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Answers the protocol's calls for one model with constant responses; never computes anything."""

    def __init__(self, counter: RequestCounter | None = None) -> None:
        self.counter = counter or RequestCounter(None)
        self.infer_response = pb.ModelInferResponse(model_name=MODEL_NAME, model_version="1")
        self.infer_response.outputs.add(name=OUTPUT_NAME, datatype="FP32", shape=[1, 1])
        self.infer_response.raw_output_contents.append(np.zeros(1, dtype=np.float32).tobytes())
        self.metadata = pb.ModelMetadataResponse(name=MODEL_NAME, versions=["1"], platform="floor")
        self.metadata.inputs.add(name=INPUT_NAME, datatype="FP32", shape=[-1, FEATURES])
        self.metadata.outputs.add(name=OUTPUT_NAME, datatype="FP32", shape=[-1, 1])
        self.config = model_config_response(platform="floor")

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name == MODEL_NAME)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="floor", version=str(os.getpid()))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        return self.metadata

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        return self.config

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        self.counter.add()
        return self.infer_response

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for _ in request_iterator:
            yield pb.ModelStreamInferResponse(infer_response=self.infer_response)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> pb.ModelStatisticsResponse:
        return pb.ModelStatisticsResponse()

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        response.models.add(name=MODEL_NAME, version="1", state="READY")
        return response

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the floor serves one fixed model")

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the floor serves one fixed model")


async def serve(host: str, port: int, announce: bool, servicer: FloorServicer, name: str = "floor") -> None:
    """One worker: serve until SIGTERM or SIGINT."""
    server = aio.server(options=CHANNEL_OPTIONS)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"{name}: could not bind {host}:{port}")
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await server.start()
    print(f"{WORKER_READY} on {host}:{bound} pid={os.getpid()}", flush=True)
    if announce:
        print(f"{name} listening on {host}:{bound} workers=1", flush=True)
    await stopping.wait()
    await server.stop(1.0)


def supervise(child_command: list[str], host: str, port: int, workers: int, name: str = "floor") -> int:
    """Start `workers` single-worker processes on one port; stop them all on SIGTERM or when one dies."""
    command = [*child_command, "--host", host, "--port", str(port), "--child"]
    children = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(workers)]

    def stop_children(*_: object) -> None:
        for child in children:
            if child.poll() is None:
                child.terminate()

    signal.signal(signal.SIGTERM, stop_children)
    signal.signal(signal.SIGINT, stop_children)
    try:
        for child in children:
            assert child.stdout is not None
            line = child.stdout.readline()
            if WORKER_READY not in line:
                print(f"{name}: a worker failed to start (exit {child.poll()})", file=sys.stderr, flush=True)
                return 1
        print(f"{name} listening on {host}:{port} workers={workers}", flush=True)
        codes = [child.wait() for child in children]
        return 1 if any(code not in (0, -signal.SIGTERM) for code in codes) else 0
    finally:
        stop_children()
        for child in children:
            child.wait()


def parse_server_args(prog: str, description: str, argv: list[str] | None) -> argparse.Namespace:
    """The flags of the floor and of the hand-rolled server."""
    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="port to listen on (not 0 with --workers > 1)")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    parser.add_argument("--count-dir", type=Path, default=None, help="count ModelInfer calls in files here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workers > 1 and args.port == 0:
        parser.error("--workers > 1 needs an explicit --port for all workers to share")
    return args


def child_command(module: str, args: argparse.Namespace) -> list[str]:
    """How a supervisor starts one worker of `module` with the same options."""
    return [sys.executable, "-m", module, *(["--count-dir", str(args.count_dir)] if args.count_dir else [])]


def main(argv: list[str] | None = None) -> int:
    module = "bench.predictor.floor_server"
    args = parse_server_args(module, (__doc__ or "").split("\n")[0], argv)
    if args.workers > 1:
        return supervise(child_command(module, args), args.host, args.port, args.workers)
    import uvloop

    servicer = FloorServicer(RequestCounter(args.count_dir))
    uvloop.run(serve(args.host, args.port, announce=not args.child, servicer=servicer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
