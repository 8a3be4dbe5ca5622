"""Fresco's gateway: the model-aware front door of the prediction path."""
