"""The hand-rolled peer: what a user could write instead of Fresco in about 40 lines, a grpc.aio +
uvloop server running ONNX Runtime inline in ModelInfer (one intra-op thread), with no batching,
metrics, tracing or checks. Everything else it answers as the floor does.

    python -m bench.predictor.handrolled_server --model FILE.onnx --port P [--workers N] [--count-dir D]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.predictor.floor_server import (
    Context,
    FloorServicer,
    RequestCounter,
    child_command,
    parse_server_args,
    serve,
    supervise,
)
from bench.predictor.spec import INPUT_NAME, MODEL_NAME, OUTPUT_NAME
from fresco.api.inference import grpc_service_pb2 as pb

MODULE = "bench.predictor.handrolled_server"


class HandRolledServicer(FloorServicer):
    """ModelInfer runs the model on the request's raw FP32 rows and answers with its raw output."""

    def __init__(self, model: Path, counter: RequestCounter) -> None:
        super().__init__(counter)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        self.counter.add()
        rows = np.frombuffer(request.raw_input_contents[0], dtype=np.float32).reshape(tuple(request.inputs[0].shape))
        (output,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: rows})
        response = pb.ModelInferResponse(model_name=MODEL_NAME, model_version="1", id=request.id)
        response.outputs.add(name=OUTPUT_NAME, datatype="FP32", shape=output.shape)
        response.raw_output_contents.append(output.tobytes())
        return response


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # --model is ours; the rest are the floor's flags.
    model_at = argv.index("--model")
    model = Path(argv[model_at + 1])
    rest = argv[:model_at] + argv[model_at + 2 :]
    args = parse_server_args(MODULE, (__doc__ or "").split("\n")[0], rest)
    if args.workers > 1:
        return supervise([*child_command(MODULE, args), "--model", str(model)], args.host, args.port, args.workers,
                         name="handrolled")  # fmt: skip
    import uvloop

    servicer = HandRolledServicer(model, RequestCounter(args.count_dir))
    uvloop.run(serve(args.host, args.port, announce=not args.child, servicer=servicer, name="handrolled"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
