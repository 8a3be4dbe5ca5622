"""The benchmark model's names and shapes, shared by every part (kept free of heavy imports so the
floor server starts fast)."""

from __future__ import annotations

MODEL_NAME = "mlp"
BIG_MODEL_NAME = "mlp_big"
INPUT_NAME = "input"
OUTPUT_NAME = "variable"
MLSERVER_OUTPUT_NAME = "predict"  # the only regression output MLServer's SKLearnModel answers with
FEATURES = 32
