"""`python -m bench.int8.session_memory MODEL.onnx`: the resident memory an ONNX Runtime session of the model adds
to a fresh process (after loading it and running one row), printed as JSON. One process per model, so that
neither model's pages count toward the other's; a session of a one-node model runs first, so that ONNX Runtime's
own start-up memory is not counted as the model's."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from bench.measure import memory


def _session(model: bytes | str, width: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    session.run(None, {spec.name: np.zeros((1, width or int(spec.shape[1])), dtype=np.float32)})
    return session


def _identity() -> bytes:
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "warmup",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return bytes(model.SerializeToString())


def main(path: Path) -> None:
    warmup = _session(_identity(), 4)
    before = memory(os.getpid())
    session = _session(str(path))
    after = memory(os.getpid())
    del session, warmup
    print(json.dumps({"rss_bytes": after.rss - before.rss, "pss_bytes": after.pss - before.pss}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
