"""`python -m gateway --predictor HOST:PORT --port N`: serve predictions through the front door."""

from __future__ import annotations

import sys

from chassis.logs import configure_logging
from chassis.server import run, serve
from chassis.settings import parse_settings
from gateway.server import build_server, start_background
from gateway.settings import GatewaySettings


async def main(settings: GatewaySettings) -> None:
    gateway = build_server(settings)
    # The route watch and the metric reports start once the server runs, on its loop.
    await serve(gateway.app, lambda: start_background(gateway))


if __name__ == "__main__":
    settings = parse_settings(GatewaySettings, sys.argv[1:])
    configure_logging("gateway", settings.log_level, settings.log_format)
    run(main(settings))
