"""What a calling service does with the light client, run by test_python_client_install.py inside a virtualenv
that holds only `pip install <repo>` (no extras): predictions through the gateway (blocking and asyncio, one by
one and in a batch, with a bearer token, a trace context, and without the token), and the experiment hash
against the committed vectors. Prints one JSON report; imports nothing from tests/ (not installed there).

Usage: python light_client_run.py GATEWAY TOKEN TRACEPARENT ROWS_JSON
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

import grpc

import fresco
from fresco.client import AsyncGatewayClient, GatewayClient, outputs, predict_request
from fresco.credentials import ClientSecurity
from fresco.experiments.assignment import committed_vectors, disagreements

MODEL = "demo"
SERVER_PACKAGES = ("chassis", "predictor", "gateway", "feature_service", "model_manager", "experiment_service")


def features(row: Sequence[float]) -> dict[str, float]:
    return {f"f{i}": value for i, value in enumerate(row)}


def probabilities(response: Any) -> list[float]:
    values: list[float] = outputs(response)["probabilities"].tolist()
    return values


async def predict_async(gateway: str, security: ClientSecurity, row: Sequence[float]) -> list[float]:
    async with AsyncGatewayClient(gateway, security=security) as client:
        return probabilities(await client.predict(MODEL, features(row)))


def main(gateway: str, token: str, traceparent: str, rows: list[list[float]]) -> dict[str, Any]:
    security = ClientSecurity(token=token)
    report: dict[str, Any] = {"fresco_file": fresco.__file__, "prefix": sys.prefix}
    with GatewayClient(gateway, security=security) as client:
        report["predict"] = [probabilities(client.predict(MODEL, features(row))) for row in rows]
        batch = client.predict_batch([predict_request(MODEL, features(row)) for row in rows])
        report["predict_batch"] = [probabilities(response) for response in batch.responses]
        report["trace_id"] = client.predict(MODEL, features(rows[0]), trace={"traceparent": traceparent}).trace_id
    report["predict_async"] = asyncio.run(predict_async(gateway, security, rows[0]))
    with GatewayClient(gateway) as anonymous:
        try:
            anonymous.predict(MODEL, features(rows[0]))
            report["without_token"] = "OK"
        except grpc.RpcError as refused:
            report["without_token"] = refused.code().name
    vectors = committed_vectors()
    report["vectors"] = sum(len(vectors[kind]) for kind in ("fnv1a32", "buckets", "placements"))
    report["disagreements"] = disagreements(vectors)
    report["server_modules"] = sorted(name for name in sys.modules if name.partition(".")[0] in SERVER_PACKAGES)
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))))
