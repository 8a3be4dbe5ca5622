"""`python -m model_manager --data-dir DIR --port N`: serve the model registry."""

from __future__ import annotations

import sys

from chassis.logs import configure_logging
from chassis.server import run, serve
from chassis.settings import parse_settings
from model_manager.server import build_server
from model_manager.settings import ModelManagerSettings


async def main(settings: ModelManagerSettings) -> None:
    service = build_server(settings)
    await serve(service.app, ready=service.ready)


if __name__ == "__main__":
    settings = parse_settings(ModelManagerSettings, sys.argv[1:])
    configure_logging("model_manager", settings.log_level, settings.log_format)
    run(main(settings))
