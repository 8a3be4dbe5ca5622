"""Calls a predictor's REST form (KServe v2 over HTTP) with Triton's own Python HTTP client, unchanged,
and prints what each call gave as one JSON object.

Run as `python triton_http_probe.py HOST:PORT EXPLICIT_HOST:PORT TOKEN < plan.json`, the plan being
{"rows": a list of lists of 8 floats, "texts": strings for the echo model, "model_path": the demo
model's ONNX file, "config": a Triton JSON config for it}. The first predictor serves `demo` and
`echo`; the second runs in explicit model-control mode with auth on (TOKEN is an admin's) and has
`second` on disk but not loaded. Tensors come back as {"datatype", "shape", "base64"} of their bytes,
so the test compares them bit for bit. It runs in its own process: tritonclient.http brings gevent,
which has no business in the test process (see triton_probe.py for the gRPC client's reason).
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

import numpy as np
import tritonclient.http as triton
from triton_probe import attempt  # type: ignore[import-not-found]


def tensors(result: triton.InferResult) -> dict[str, Any]:
    """Each output of an answer: datatype, shape, and its elements' bytes (BYTES: the strings)."""
    outputs = {}
    for output in result.get_response()["outputs"]:
        array = result.as_numpy(output["name"])
        if output["datatype"] == "BYTES":
            data: Any = [item.decode() if isinstance(item, bytes) else item for item in array.reshape(-1)]
        else:
            data = base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()
        outputs[output["name"]] = {"datatype": output["datatype"], "shape": list(array.shape), "data": data}
    response = result.get_response()
    return {"id": response.get("id", ""), "model_version": response["model_version"], "outputs": outputs}


def demo_input(rows: np.ndarray, binary: bool) -> list[triton.InferInput]:
    tensor = triton.InferInput("X", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, binary_data=binary)
    return [tensor]


def echo_input(texts: list[str], binary: bool) -> list[triton.InferInput]:
    tensor = triton.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_), binary_data=binary)
    return [tensor]


def main() -> None:
    address, explicit_address, token = sys.argv[1:4]
    plan = json.load(sys.stdin)
    rows = np.array(plan["rows"], dtype=np.float32)
    texts: list[str] = plan["texts"]
    client = triton.InferenceServerClient(address)
    outputs = [triton.InferRequestedOutput(name, binary_data=False) for name in ("label", "probabilities")]
    report: dict[str, Any] = {
        "is_server_live": attempt(client.is_server_live),
        "is_server_ready": attempt(client.is_server_ready),
        "is_model_ready": attempt(lambda: client.is_model_ready("demo")),
        "is_model_ready_v1": attempt(lambda: client.is_model_ready("demo", "1")),
        "is_model_ready_unknown": attempt(lambda: client.is_model_ready("no-such-model")),
        "get_server_metadata": attempt(client.get_server_metadata),
        "get_model_metadata": attempt(lambda: client.get_model_metadata("demo")),
        "get_model_metadata_v1": attempt(lambda: client.get_model_metadata("demo", "1")),
        "get_model_config": attempt(lambda: client.get_model_config("demo")),
        "infer_json": attempt(
            lambda: tensors(client.infer("demo", demo_input(rows, False), outputs=outputs, request_id="json-1"))
        ),
        # No outputs named: tritonclient asks for all of them as binary data (binary_data_output).
        "infer_binary": attempt(lambda: tensors(client.infer("demo", demo_input(rows, True), request_id="bin-1"))),
        "infer_mixed": attempt(
            lambda: tensors(
                client.infer(
                    "demo",
                    demo_input(rows, False),
                    outputs=[
                        triton.InferRequestedOutput("probabilities", binary_data=True),
                        triton.InferRequestedOutput("label", binary_data=False),
                    ],
                )
            )
        ),
        "infer_gzip": attempt(
            lambda: tensors(client.infer("demo", demo_input(rows, True), request_compression_algorithm="gzip"))
        ),
        "infer_echo_json": attempt(
            lambda: tensors(
                client.infer(
                    "echo", echo_input(texts, False), outputs=[triton.InferRequestedOutput("echo", binary_data=False)]
                )
            )
        ),
        "infer_echo_binary": attempt(lambda: tensors(client.infer("echo", echo_input(texts, True)))),
        "infer_unknown_model": attempt(lambda: tensors(client.infer("no-such-model", demo_input(rows, True)))),
        "infer_bad_shape": attempt(lambda: tensors(client.infer("demo", demo_input(rows[:, :7], False)))),
        "infer_unknown_output": attempt(
            lambda: tensors(client.infer("demo", demo_input(rows, True), outputs=[triton.InferRequestedOutput("nope")]))
        ),
        "get_model_repository_index": attempt(client.get_model_repository_index),
        "load_not_explicit": attempt(lambda: client.load_model("demo")),
    }
    report["get_inference_statistics"] = attempt(lambda: client.get_inference_statistics("demo"))
    report["get_inference_statistics_all"] = attempt(client.get_inference_statistics)
    report["lifecycle"] = lifecycle(explicit_address, token, rows, plan)
    print(json.dumps(report))


def lifecycle(address: str, token: str, rows: np.ndarray, plan: dict[str, Any]) -> dict[str, Any]:
    """Load, infer on, and unload models of the explicit predictor, which wants an admin's token."""
    client = triton.InferenceServerClient(address)
    auth = {"Authorization": f"Bearer {token}"}
    model = open(plan["model_path"], "rb").read()  # noqa: SIM115 (one read, in a short-lived probe)
    steps: dict[str, Any] = {
        "load_without_token": attempt(lambda: client.load_model("second")),
        "ready_before": attempt(lambda: client.is_model_ready("second", headers=auth)),
        "load": attempt(lambda: client.load_model("second", headers=auth)),
        "ready_after_load": attempt(lambda: client.is_model_ready("second", headers=auth)),
        "infer_second": attempt(lambda: tensors(client.infer("second", demo_input(rows, True), headers=auth))),
        "index": attempt(lambda: client.get_model_repository_index(headers=auth)),
        "unload": attempt(lambda: client.unload_model("second", headers=auth)),
        "ready_after_unload": attempt(lambda: client.is_model_ready("second", headers=auth)),
        "load_inline": attempt(
            lambda: client.load_model("inline", headers=auth, config=plan["config"], files={"file:1/model.onnx": model})
        ),
        "infer_inline": attempt(lambda: tensors(client.infer("inline", demo_input(rows, True), headers=auth))),
        "unload_inline": attempt(lambda: client.unload_model("inline", headers=auth)),
        "load_bad_config": attempt(
            lambda: client.load_model("second", headers=auth, config=json.dumps({"max_batch_size": "many"}))
        ),
    }
    return steps


if __name__ == "__main__":
    main()
