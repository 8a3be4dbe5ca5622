"""`python -m feature_service --definitions FILE --port N`: serve online features."""

from __future__ import annotations

import sys

from chassis.errors import InvalidArgument
from chassis.logs import configure_logging
from chassis.server import run, serve
from chassis.settings import parse_settings
from feature_service.server import build_server, load_catalog, load_offline_views
from feature_service.settings import FeatureServiceSettings

EXIT_BAD_DEFINITIONS = 2


async def main(settings: FeatureServiceSettings) -> None:
    service = build_server(settings)
    await serve(service.app, ready=service.ready)


if __name__ == "__main__":
    settings = parse_settings(FeatureServiceSettings, sys.argv[1:])
    configure_logging("feature_service", settings.log_level, settings.log_format)
    try:
        # A wrong definitions file will not fix itself: say so and exit rather than sit NOT_SERVING.
        load_offline_views(settings, load_catalog(settings))
    except InvalidArgument as err:
        print(f"feature_service: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_DEFINITIONS)
    run(main(settings))
