"""gRPC's proxyless xDS client, in a process of its own because the bootstrap must be in the
environment before grpc starts. It reads commands on stdin, one a line, and answers each with one
JSON line:
  until LABEL   call `xds:///<model>` until a version-LABEL server answers: {"calls": n}
  count N       make N calls: {"counts": {label: n, ...}}
  connect       start resolving (which opens the ADS stream) without a call: {"connecting": true}
Run as `python -m tests.model_manager.xds_client MODEL` with GRPC_XDS_BOOTSTRAP_CONFIG set."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter

import grpc

from tests.model_manager.xds_version_server import METHOD

_CALL_TIMEOUT_S = 30.0
_UNTIL_S = 90.0  # bounds the wait for a new configuration; generous for a loaded machine


def main(model: str) -> None:
    with grpc.insecure_channel(f"xds:///{model}") as channel:
        which = channel.unary_unary(METHOD)

        def call() -> str:
            answer: bytes = which(b"", timeout=_CALL_TIMEOUT_S, wait_for_ready=True)
            return answer.decode()

        for line in sys.stdin:
            command, _, argument = line.strip().partition(" ")
            try:
                if command == "until":
                    deadline, calls, reached = time.monotonic() + _UNTIL_S, 0, False
                    while not reached and time.monotonic() < deadline:
                        calls += 1
                        reached = call() == argument
                    reply: dict[str, object] = {"calls": calls, "reached": reached}
                elif command == "connect":
                    channel.subscribe(lambda state: None, try_to_connect=True)
                    reply = {"connecting": True}
                elif command == "count":
                    reply = {"counts": dict(Counter(call() for _ in range(int(argument))))}
                else:
                    reply = {"error": f"unknown command {command!r}"}
            except grpc.RpcError as err:
                reply = {"error": f"{err.code()}: {err.details()}"}
            print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
