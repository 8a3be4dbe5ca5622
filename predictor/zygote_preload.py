"""What the zygote (predictor.zygote) imports before it forks workers.

Not onnxruntime: importing it starts a thread, and a fork carries only the thread that forks. Its code
is shared through the page cache anyway. The objects imported here are frozen out of the garbage
collector's reach, so that a worker's collections never write to (and so copy) the pages they share.
"""

from __future__ import annotations

import gc

import uvloop  # noqa: F401

import chassis.server  # noqa: F401
import predictor.backends.base
import predictor.server
import predictor.zygote  # noqa: F401

gc.freeze()
