"""`python -m experiment_service --state-dir DIR --port N`: serve experiments."""

from __future__ import annotations

import sys

from chassis.logs import configure_logging
from chassis.server import run, serve
from chassis.settings import parse_settings
from experiment_service.server import build_server
from experiment_service.settings import ExperimentServiceSettings


async def main(settings: ExperimentServiceSettings) -> None:
    service = build_server(settings)
    await serve(service.app, ready=service.ready)


if __name__ == "__main__":
    settings = parse_settings(ExperimentServiceSettings, sys.argv[1:])
    configure_logging("experiment_service", settings.log_level, settings.log_format)
    run(main(settings))
