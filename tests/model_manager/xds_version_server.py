"""A real, minimal gRPC server standing for one model version in the xDS tests: it answers
`/fresco.test.Version/Which` with its label and serves the health check. Run as
`python -m tests.model_manager.xds_version_server LABEL`; it prints where it listens."""

from __future__ import annotations

import signal
import sys
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

METHOD = "/fresco.test.Version/Which"


def main(label: str) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    answer = label.encode()

    def which(request: bytes, context: grpc.ServicerContext) -> bytes:
        return answer

    handler = grpc.unary_unary_rpc_method_handler(which)  # bytes in, bytes out: no serializers
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("fresco.test.Version", {"Which": handler})])
    checker = health.HealthServicer()
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"version-{label} listening on 127.0.0.1:{port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    server.wait_for_termination()


if __name__ == "__main__":
    main(sys.argv[1])
