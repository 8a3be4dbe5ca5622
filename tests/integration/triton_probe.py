"""Calls a predictor with Triton's own Python client, unchanged, and prints what each call gave as
one JSON object.

Run as `python triton_probe.py HOST:PORT < rows.json` (rows: a list of lists of 8 floats). It runs in
its own process because tritonclient registers the `inference` protobuf package in the default
descriptor pool, as Fresco's generated code does; the two cannot be imported together.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def attempt(call: Callable[[], Any]) -> dict[str, Any]:
    """{"ok": true, "value": ...} or {"ok": false, "status": ..., "error": ...}."""
    try:
        return {"ok": True, "value": call()}
    except InferenceServerException as err:
        return {"ok": False, "status": str(err.status()), "error": err.message()}


def infer_demo(client: triton.InferenceServerClient, rows: np.ndarray) -> dict[str, Any]:
    inputs = [triton.InferInput("X", list(rows.shape), "FP32")]
    inputs[0].set_data_from_numpy(rows)
    outputs = [triton.InferRequestedOutput("label"), triton.InferRequestedOutput("probabilities")]
    result = client.infer("demo", inputs, outputs=outputs, request_id="triton-1", client_timeout=30)
    response = result.get_response(as_json=True)
    return {
        "model_name": response["model_name"],
        "model_version": response["model_version"],
        "id": response.get("id", ""),
        "label": result.as_numpy("label").tolist(),
        "probabilities": result.as_numpy("probabilities").tolist(),
    }


def infer_echo(client: triton.InferenceServerClient, items: list[bytes]) -> list[str]:
    text = triton.InferInput("text", [len(items)], "BYTES")
    text.set_data_from_numpy(np.array(items, dtype=np.object_))
    result = client.infer("echo", [text], client_timeout=30)
    return [item.decode("latin-1") for item in result.as_numpy("echo").tolist()]


def main() -> None:
    address = sys.argv[1]
    rows = np.asarray(json.load(sys.stdin), dtype=np.float32)
    client = triton.InferenceServerClient(address)
    report = {
        "is_server_live": attempt(client.is_server_live),
        "is_server_ready": attempt(client.is_server_ready),
        "is_model_ready": attempt(lambda: client.is_model_ready("demo")),
        "is_model_ready_v1": attempt(lambda: client.is_model_ready("demo", "1")),
        "get_server_metadata": attempt(lambda: client.get_server_metadata(as_json=True)),
        "get_model_metadata": attempt(lambda: client.get_model_metadata("demo", as_json=True)),
        "get_model_repository_index": attempt(lambda: client.get_model_repository_index(as_json=True)),
        "infer": attempt(lambda: infer_demo(client, rows)),
        "infer_unknown_model": attempt(lambda: client.infer("no-such-model", [], client_timeout=30).get_response()),
        "infer_bytes": attempt(lambda: infer_echo(client, [b"hello", b"", b"a b"])),
        "get_inference_statistics": attempt(lambda: client.get_inference_statistics("demo", as_json=True)),
        "get_model_config": attempt(lambda: client.get_model_config("demo", as_json=True)),
    }
    client.close()
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
