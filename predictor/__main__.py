"""`python -m predictor --model-repository DIR --port N`: serve models over the inference protocol."""

from __future__ import annotations

import sys

from chassis.logs import configure_logging
from chassis.settings import parse_settings
from predictor.settings import PredictorSettings

if __name__ == "__main__":
    settings = parse_settings(PredictorSettings, sys.argv[1:])
    configure_logging("predictor", settings.log_level, settings.log_format)
    if settings.workers > 1 and settings.worker_index is None:
        # The supervisor imports little: its workers are forked from a zygote that imported the rest.
        from predictor.workers import supervise

        sys.exit(supervise(settings, sys.argv[1:]))
    from predictor.server import run_predictor

    run_predictor(settings)
