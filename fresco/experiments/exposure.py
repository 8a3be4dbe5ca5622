"""The deterministic exposure id: every replica that exposes a unit to an arm sends the same id."""

from __future__ import annotations

import hashlib


def exposure_id(experiment_key: str, phase: int, unit_type: str, unit_id: str, arm: str) -> str:
    """The first 16 bytes, in hex, of SHA-256 over "key\\nphase\\nunit_type\\nunit_id\\narm" (UTF-8)."""
    text = f"{experiment_key}\n{phase}\n{unit_type}\n{unit_id}\n{arm}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
