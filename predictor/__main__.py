"""`python -m predictor --model-repository DIR --port N`: serve models over the inference protocol."""

from __future__ import annotations

import sys

from chassis.lifetime import exit_with_parent
from chassis.logs import configure_logging
from chassis.server import run, serve
from chassis.settings import parse_settings
from predictor.server import build_server
from predictor.settings import PredictorSettings


async def main(settings: PredictorSettings) -> None:
    sys.setswitchinterval(settings.gil_switch_interval_us / 1e6)
    predictor = build_server(settings)
    await serve(predictor.app, ready=predictor.load_models)


if __name__ == "__main__":
    settings = parse_settings(PredictorSettings, sys.argv[1:])
    configure_logging("predictor", settings.log_level, settings.log_format)
    if settings.workers > 1 and settings.worker_index is None:
        from predictor.workers import supervise

        sys.exit(supervise(settings, sys.argv[1:]))
    if settings.worker_index is not None and settings.supervisor_pid:
        # A supervisor killed with SIGKILL cannot stop its workers: they stop themselves instead.
        exit_with_parent(settings.supervisor_pid)
    run(main(settings))
