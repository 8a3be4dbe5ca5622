"""Fresco's client SDK and CLI. Generated protobuf stubs live in `fresco.api`."""
