"""The predictor benchmark: Fresco's predictor against MLServer and a do-nothing gRPC floor, loaded by
perf_analyzer over the inference protocol, with the in-process ONNX Runtime ceiling and model load times.

Run it with `python -m bench.predictor` from the repository root (see README.md beside this file).
"""
