"""Batching benchmark: Fresco's dynamic batcher on a model whose batch-1 compute is over 1 ms, against
Fresco with batching off and MLServer's adaptive batching on the same model (see README.md)."""
