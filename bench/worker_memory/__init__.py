"""The worker-memory benchmark: resident memory (RSS and PSS) of `--workers 4` against one worker on a
~200 MB model, with the workers' weights shared and private, and CPU per request either way.

Run it with `python -m bench.worker_memory` from the repository root (see README.md beside this file).
"""
