"""Starts MLServer with one addition: Triton's ModelConfig rpc, which MLServer lacks and perf_analyzer
calls once before it loads a server.

    <mlserver venv>/bin/python bench/predictor/mlserver_launcher.py CONFIG_FILE start MODELS_DIR

CONFIG_FILE holds a serialized `inference.ModelConfigResponse` (the benchmark writes it); every
ModelConfig call gets those bytes. Everything else is MLServer unchanged: the extra handler sits beside
its own servicer and never touches ModelInfer. This file runs in MLServer's own virtualenv, so it imports
nothing from Fresco.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import grpc

SERVICE = "inference.GRPCInferenceService"


def with_model_config(add_servicer: Any, config_bytes: bytes) -> Any:
    """Wrap MLServer's `add_GRPCInferenceServiceServicer_to_server` to also register ModelConfig."""

    async def model_config(request: bytes, context: Any) -> bytes:
        return config_bytes

    def add(servicer: Any, server: Any) -> None:
        add_servicer(servicer, server)
        handler = grpc.method_handlers_generic_handler(
            SERVICE, {"ModelConfig": grpc.unary_unary_rpc_method_handler(model_config)}
        )
        server.add_generic_rpc_handlers((handler,))

    return add


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    config_bytes = Path(sys.argv[1]).read_bytes()
    server_module: Any = importlib.import_module("mlserver.grpc.server")
    server_module.add_GRPCInferenceServiceServicer_to_server = with_model_config(
        server_module.add_GRPCInferenceServiceServicer_to_server, config_bytes
    )
    cli: Any = importlib.import_module("mlserver.cli")
    sys.argv = ["mlserver", *sys.argv[2:]]
    result = cli.main()
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
