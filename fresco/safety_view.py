"""A model family's safety score in the terminal: the score and a short table of its four parts with what is missing."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from fresco.api.models.v1 import monitoring_pb2 as mpb

# Missing items shown per part; the API and the report list them all.
SHOWN_MISSING = 5


def safety_table(score: mpb.SafetyScore) -> Table:
    """One row per part: score, covered/total, and the first missing items."""
    table = Table(title=f"Safety score of {escape(score.model_name)}: {score.score:.0f} / 100")
    for column in ("part", "score", "covered", "missing"):
        table.add_column(column)
    for part in score.parts:
        missing = list(part.missing[:SHOWN_MISSING])
        if len(part.missing) > SHOWN_MISSING:
            missing.append(f"… and {len(part.missing) - SHOWN_MISSING} more")
        table.add_row(
            escape(part.name), f"{part.score:.0%}", f"{part.covered}/{part.total}", escape("\n".join(missing) or "-")
        )
    return table
