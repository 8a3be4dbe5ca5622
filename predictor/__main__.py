"""`python -m predictor --model-repository DIR --port N`: serve models over the inference protocol."""

from __future__ import annotations

import os
import sys

# With `--workers N` the process parses its flags, then re-executes itself (same pid) as the
# supervisor: `python -m predictor --supervise PLAN FLAGS...`. The supervisor only runs workers, so it
# holds neither pydantic nor gRPC (about 20 MB less per machine); its workers are forked from a zygote
# that imported the serving stack once, and they parse FLAGS themselves.
SUPERVISE = "--supervise"


def main(argv: list[str]) -> int | None:
    if argv[:1] == [SUPERVISE]:
        from predictor.worker_plan import WorkerPlan
        from predictor.workers import supervise

        return supervise(WorkerPlan.from_json(argv[1]), argv[2:])

    from chassis.settings import parse_settings
    from predictor.settings import PredictorSettings

    settings = parse_settings(PredictorSettings, argv)
    if settings.workers > 1 and settings.worker_index is None:
        from predictor.worker_plan import WorkerPlan

        plan = WorkerPlan.of(settings).to_json()
        os.execv(sys.executable, [sys.executable, "-m", "predictor", SUPERVISE, plan, *argv])

    from chassis.logs import configure_logging
    from predictor.server import run_predictor

    configure_logging("predictor", settings.log_level, settings.log_format)
    run_predictor(settings)
    return None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
