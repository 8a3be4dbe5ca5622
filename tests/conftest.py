"""Settings every test shares.

Hypothesis runs derandomized: each property test draws the same examples on every run and every
machine, so a coverage assertion over generated examples cannot pass or fail by chance, and no
example database carries state from one run to the next. `FRESCO_HYPOTHESIS_PROFILE=explore` draws
fresh examples for local bug hunting; CI never sets it.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, database=None, print_blob=True)
settings.load_profile(os.environ.get("FRESCO_HYPOTHESIS_PROFILE", "ci"))
