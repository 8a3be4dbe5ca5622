"""The feature-store benchmark: Fresco's feature service against Feast 0.67 on the same data in one Redis,
read 1 and 100 entities × 40 features at a time, Fresco's memory tier warm and off, unknown entities too.

Run it with `python -m bench.features` from the repository root (see README.md beside this file).
"""
