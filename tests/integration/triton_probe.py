"""Calls a predictor with Triton's own Python client, unchanged, and prints what each call gave as
one JSON object.

Run as `python triton_probe.py HOST:PORT [EXPLICIT_HOST:PORT] < plan.json`, the plan being
{"rows": a list of lists of 8 floats, "stream": the row count of each request sent on one stream,
"stream_bad_after": the index of the request a malformed one follows, "model_path": the demo
model's ONNX file, sent inline with load_model's `files`}. The first predictor serves
`demo` and `echo`; the optional second one runs in explicit model-control mode with `demo` loaded
and `second` (a copy of demo) on disk but not loaded, for the load and unload calls. The probe runs
in its own process because tritonclient registers the `inference` protobuf package in the default
descriptor pool, as Fresco's generated code does; the two cannot be imported together.
"""

from __future__ import annotations

import json
import queue
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


def demo_inputs(rows: np.ndarray) -> list[triton.InferInput]:
    tensor = triton.InferInput("X", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
    return [tensor]


def answer(result: triton.InferResult) -> dict[str, Any]:
    """What an InferResult holds: names, id, and each output returned, as lists."""
    response = result.get_response()
    return {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "id": response.id,
        "outputs": [tensor.name for tensor in response.outputs],
        **{tensor.name: result.as_numpy(tensor.name).tolist() for tensor in response.outputs},
    }


def infer_demo(
    client: triton.InferenceServerClient,
    rows: np.ndarray,
    request_id: str,
    outputs: list[str] | None,
    model: str = "demo",
) -> dict[str, Any]:
    requested = None if outputs is None else [triton.InferRequestedOutput(name) for name in outputs]
    result = client.infer(model, demo_inputs(rows), outputs=requested, request_id=request_id, client_timeout=30)
    return answer(result)


def infer_echo(client: triton.InferenceServerClient, items: list[bytes]) -> list[str]:
    text = triton.InferInput("text", [len(items)], "BYTES")
    text.set_data_from_numpy(np.array(items, dtype=np.object_))
    result = client.infer("echo", [text], client_timeout=30)
    return [item.decode("latin-1") for item in result.as_numpy("echo").tolist()]


def stream(client: triton.InferenceServerClient, rows: np.ndarray, sizes: list[int], bad_after: int) -> dict[str, Any]:
    """Several requests on one ModelStreamInfer stream, a malformed one among them; the answers by id,
    the errors, and the order the ids came back in."""
    received: queue.Queue[tuple[triton.InferResult | None, InferenceServerException | None]] = queue.Queue()
    client.start_stream(callback=lambda result, error: received.put((result, error)), stream_timeout=60)
    sent = 0
    try:
        start = 0
        for index, size in enumerate(sizes):
            client.async_stream_infer("demo", demo_inputs(rows[start : start + size]), request_id=f"s-{index}")
            sent += 1
            start += size
            if index == bad_after:  # 3 features instead of 8: fails alone, the stream goes on
                client.async_stream_infer("demo", demo_inputs(rows[:1, :3]), request_id="s-bad")
                sent += 1
        answers: dict[str, Any] = {}
        errors: list[str] = []
        order: list[str] = []
        for _ in range(sent):
            result, error = received.get(timeout=30)
            if error is not None:
                errors.append(error.message())
                continue
            assert result is not None
            found = answer(result)
            answers[found["id"]] = found
            order.append(found["id"])
    finally:
        client.stop_stream()
    return {"answers": answers, "errors": errors, "order": order}


def shared(client: triton.InferenceServerClient, plan: dict[str, Any]) -> dict[str, Any]:
    """Every call against the predictor serving demo and echo (model control mode none)."""
    rows = np.asarray(plan["rows"], dtype=np.float32)
    report = {
        "is_server_live": attempt(client.is_server_live),
        "is_server_ready": attempt(client.is_server_ready),
        "is_model_ready": attempt(lambda: client.is_model_ready("demo")),
        "is_model_ready_v1": attempt(lambda: client.is_model_ready("demo", "1")),
        "is_model_ready_unknown": attempt(lambda: client.is_model_ready("no-such-model")),
        "get_server_metadata": attempt(lambda: client.get_server_metadata(as_json=True)),
        "get_model_metadata": attempt(lambda: client.get_model_metadata("demo", as_json=True)),
        "get_model_metadata_v1": attempt(lambda: client.get_model_metadata("demo", "1", as_json=True)),
        "get_model_config": attempt(lambda: client.get_model_config("demo", as_json=True)),
        "get_model_config_echo": attempt(lambda: client.get_model_config("echo", as_json=True)),
        "get_model_config_unknown": attempt(lambda: client.get_model_config("no-such-model", as_json=True)),
        "get_model_repository_index": attempt(lambda: client.get_model_repository_index(as_json=True)),
        # Statistics before and after a known amount of demo traffic: the infers and the stream below.
        "statistics_before": attempt(lambda: client.get_inference_statistics("demo", as_json=True)),
    }
    report["infer"] = attempt(lambda: infer_demo(client, rows, "triton-1", ["label", "probabilities"]))
    report["infer_all_outputs"] = attempt(lambda: infer_demo(client, rows[:3], "", None))
    report["infer_subset"] = attempt(lambda: infer_demo(client, rows[3:5], "triton-subset", ["probabilities"]))
    report["stream"] = attempt(lambda: stream(client, rows, plan["stream"], plan["stream_bad_after"]))
    report["statistics_after"] = attempt(lambda: client.get_inference_statistics("demo", as_json=True))
    report["statistics_all"] = attempt(lambda: client.get_inference_statistics(as_json=True))
    report["infer_unknown_model"] = attempt(
        lambda: client.infer("no-such-model", [], client_timeout=30).get_response().id
    )
    report["infer_bytes"] = attempt(lambda: infer_echo(client, [b"hello", b"", b"a b"]))
    report["load_refused"] = attempt(lambda: client.load_model("demo", client_timeout=60))
    report["unload_refused"] = attempt(lambda: client.unload_model("demo", client_timeout=60))
    return report


def lifecycle(client: triton.InferenceServerClient, rows: np.ndarray, model: bytes) -> dict[str, Any]:
    """Load and unload `second` on the explicit-mode predictor, looking around after each step; then
    load with a config, and with files sent inline."""
    overriding = json.dumps({"max_batch_size": 4, "dynamic_batching": {"preferred_batch_size": [2]}})
    inline = json.dumps({"max_batch_size": 8, "input": [{"name": "X", "data_type": "TYPE_FP32", "dims": [8]}]})

    def index() -> dict[str, Any]:
        found: dict[str, Any] = client.get_model_repository_index(as_json=True)
        return found

    steps: list[tuple[str, Callable[[], Any]]] = [
        ("index_before", index),
        ("ready_before", lambda: client.is_model_ready("second")),
        ("infer_before", lambda: infer_demo(client, rows, "before", None, model="second")),
        ("load", lambda: client.load_model("second", client_timeout=60)),
        ("ready_loaded", lambda: client.is_model_ready("second")),
        ("index_loaded", index),
        ("config_loaded", lambda: client.get_model_config("second", as_json=True)),
        ("infer_loaded", lambda: infer_demo(client, rows, "loaded", None, model="second")),
        ("statistics_loaded", lambda: client.get_inference_statistics("second", as_json=True)),
        ("unload", lambda: client.unload_model("second", client_timeout=60)),
        ("ready_unloaded", lambda: client.is_model_ready("second")),
        ("index_unloaded", index),
        ("infer_unloaded", lambda: infer_demo(client, rows, "unloaded", None, model="second")),
        ("demo_ready", lambda: client.is_model_ready("demo")),
        ("load_unknown", lambda: client.load_model("no-such-model", client_timeout=60)),
        ("reload", lambda: client.load_model("second", client_timeout=60)),
        ("ready_reloaded", lambda: client.is_model_ready("second")),
        ("load_config", lambda: client.load_model("second", config=overriding, client_timeout=60)),
        ("config_overridden", lambda: client.get_model_config("second", as_json=True)),
        (
            "load_files",
            lambda: client.load_model("inline", config=inline, files={"file:1/model.onnx": model}, client_timeout=60),
        ),
        ("ready_inline", lambda: client.is_model_ready("inline")),
        ("infer_inline", lambda: infer_demo(client, rows, "inline", None, model="inline")),
        ("files_without_config", lambda: client.load_model("bare", files={"file:1/model.onnx": model})),
        ("files_escaping", lambda: client.load_model("bare", config="{}", files={"file:../../x.onnx": b"x"})),
    ]
    return {name: attempt(call) for name, call in steps}


def main() -> None:
    plan = json.load(sys.stdin)
    report: dict[str, Any] = {}
    client = triton.InferenceServerClient(sys.argv[1])
    try:
        report.update(shared(client, plan))
    finally:
        client.close()
    if len(sys.argv) > 2:
        explicit = triton.InferenceServerClient(sys.argv[2])
        try:
            with open(plan["model_path"], "rb") as model:
                model_bytes = model.read()
            report["lifecycle"] = lifecycle(explicit, np.asarray(plan["rows"], dtype=np.float32), model_bytes)
        finally:
            explicit.close()
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
