"""Fresco's predictor: multi-model inference over the Open Inference Protocol (KServe v2)."""
