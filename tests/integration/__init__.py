"""Integration tests: every service runs as a real process on loopback, started the way `fresco up`
starts it, and is called over gRPC with the generated stubs. This package also holds the helpers
the test modules share (request builders, answer decoders, small ONNX models built for a test)."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from fresco.api.common.v1 import values_pb2
from fresco.api.inference import grpc_service_pb2 as pb
from fresco.training import ExportedModel

# Clients may send and receive more than the services accept (64 MiB), so that the server's limit,
# not the client's, is what a test meets.
CLIENT_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]

# The wire form of each datatype the tests read back, written out here rather than taken from the
# code under test.
_NUMPY: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "INT64": np.dtype("<i8"),
    "INT32": np.dtype("<i4"),
}


class Reference:
    """The demo model run by ONNX Runtime in the test process: the answers the services must give."""

    def __init__(self, model: ExportedModel) -> None:
        self.model = model
        self._session = ort.InferenceSession(model.path.read_bytes(), providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self._session.get_outputs()]

    def predict(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs by name for a batch of rows."""
        values = self._session.run(self.output_names, {self.model.input_name: np.asarray(rows, dtype=np.float32)})
        return dict(zip(self.output_names, values, strict=True))


def features_of(row: Sequence[float]) -> dict[str, values_pb2.Value]:
    """A row of the demo model as the gateway's named features f0..f7."""
    return {f"f{i}": values_pb2.Value(double_value=float(value)) for i, value in enumerate(row)}


def infer_request(
    rows: np.ndarray,
    *,
    model: str = "demo",
    version: str = "",
    request_id: str = "",
    typed: bool = False,
    outputs: Iterable[str] = (),
) -> pb.ModelInferRequest:
    """A ModelInferRequest for the demo model's input X, raw little-endian or in fp32_contents."""
    rows = np.asarray(rows, dtype=np.float32)
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    tensor = request.inputs.add(name="X", datatype="FP32", shape=rows.shape)
    if typed:
        tensor.contents.fp32_contents.extend(rows.reshape(-1).tolist())
    else:
        request.raw_input_contents.append(rows.astype("<f4").tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """The outputs of a ModelInferResponse by name (raw contents, numeric datatypes or BYTES)."""
    assert len(response.raw_output_contents) == len(response.outputs), response
    arrays: dict[str, np.ndarray] = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if tensor.datatype == "BYTES":
            arrays[tensor.name] = np.array(split_bytes(raw), dtype=object).reshape(tuple(tensor.shape))
        else:
            arrays[tensor.name] = np.frombuffer(raw, dtype=_NUMPY[tensor.datatype]).reshape(tuple(tensor.shape))
    return arrays


def bytes_raw(items: Iterable[bytes]) -> bytes:
    """BYTES elements in the protocol's raw form: each behind its 4-byte little-endian length."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def split_bytes(raw: bytes) -> list[bytes]:
    """The elements of a raw BYTES tensor."""
    items, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        items.append(raw[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return items


def assert_matches_reference(outputs: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> None:
    """Labels equal and probabilities close to what ONNX Runtime gives in this process."""
    np.testing.assert_array_equal(outputs["label"], expected["label"])
    np.testing.assert_allclose(outputs["probabilities"], expected["probabilities"], rtol=1e-5, atol=1e-6)


def write_echo_model(repository: Path, name: str = "echo") -> Path:
    """A model with one BYTES (ONNX string) input `text` [-1] returned unchanged as `echo`."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["echo"])],
        name,
        [helper.make_tensor_value_info("text", TensorProto.STRING, [None])],
        [helper.make_tensor_value_info("echo", TensorProto.STRING, [None])],
    )
    return _save(graph, repository / name / "1" / "model.onnx")


def write_slow_model(repository: Path, name: str = "slow", width: int = 1024, depth: int = 24) -> Path:
    """A model that computes for a noticeable time: `depth` chained [width x width] MatMuls of its
    input `X` FP32 [-1, width] with a constant averaging matrix; output `mean` FP32 [-1]."""
    fill = helper.make_tensor("fill", TensorProto.FLOAT, [1], [1.0 / width])
    nodes = [helper.make_node("ConstantOfShape", ["w_shape"], ["w"], value=fill)]
    previous = "X"
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [previous, "w"], [f"h{i}"]))
        previous = f"h{i}"
    nodes.append(helper.make_node("ReduceMean", [previous], ["mean"], axes=[1], keepdims=0))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, width])],
        [helper.make_tensor_value_info("mean", TensorProto.FLOAT, [None])],
        initializer=[helper.make_tensor("w_shape", TensorProto.INT64, [2], [width, width])],
    )
    return _save(graph, repository / name / "1" / "model.onnx")


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path
