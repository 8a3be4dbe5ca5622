"""Benchmarks of Fresco's services against their peers, run on this machine."""
