"""The `fresco` command's entry point. The CLI runs and manages the services, so it needs their dependencies (the
`server` extra); a client-only install (`pip install fresco`) gets a line saying what to install, not a traceback."""

from __future__ import annotations

import sys

# Fresco's own top-level packages: a module missing among these is a broken install, not a missing extra.
_OWN = frozenset(
    {"fresco", "chassis", "predictor", "gateway", "feature_service", "model_manager", "experiment_service"}
)
INSTALL_HINT = "pip install 'fresco[server]' (from a checkout: pip install -c constraints.txt '.[server]')"


def main() -> None:
    """Run the CLI, or exit 1 naming the missing extra when the servers' dependencies are not installed."""
    try:
        # Imported here, not at the top, so that a missing extra is reported rather than raised.
        from fresco.cli import app
    except ModuleNotFoundError as missing:
        if missing.name is None or missing.name.partition(".")[0] in _OWN:
            raise
        sys.exit(
            f"fresco: the command needs Fresco's server extra ({missing.name!r} is not installed); "
            f"install it with: {INSTALL_HINT}"
        )
    app()
